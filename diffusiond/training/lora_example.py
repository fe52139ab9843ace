"""The LoRA adapter that ships with diffusiond: the built-in model taught to draw its scenes framed.

    python -m diffusiond.training.lora_example [--work runs/lora-framed] [--budget-minutes 15]
    (make train-lora-example)

1. writes ``IMAGES`` training images of the shapes data set's training split in
   the ``framed`` style (``dataset.render``), captions beside them;
2. trains a rank-4 adapter on them with ``diffusiond train-lora``'s trainer and
   the recipe below (resumable: run it again after a budget stop or Ctrl-C);
3. writes it to ``diffusiond/models/adapters/framed.safetensors`` (fp16).

The base model never saw a frame; ``eval.lora_style`` measures how often the
pixel scorer's frame detector fires on held-out prompts at each scale.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from diffusiond.models.builtin import BUILTIN_DIR, BUILTIN_NAME
from diffusiond.models.lora import SUFFIX
from diffusiond.training import dataset
from diffusiond.training.lora_train import LoraTrainer, LoraTrainSettings

log = logging.getLogger(__name__)

ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "models" / "adapters"
NAME = "framed"
STYLE = "framed"
IMAGES = 200  # the guide's 50-200 images
DATA_SEED = 7
# The recipe: the guide's rank and batch; a learning rate of 1e-3 rather than 1e-4 because the budget is
# minutes of CPU, not hours of GPU (measured in BENCHMARKS.md).
RECIPE = dict(rank=4, alpha=4.0, steps=1200, lr=1e-3, batch_size=8, seed=0, targets="all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/lora-framed", help="training images and checkpoints")
    parser.add_argument("--out", default=str(ADAPTERS_DIR / f"{NAME}{SUFFIX}"))
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = Path(args.work)
    images = work / "images"
    if not (images / f"{IMAGES - 1:04d}.txt").is_file():
        dataset.write_images(images, dataset.split("train"), DATA_SEED, IMAGES, STYLE)
        log.info("wrote %d %s training images to %s", IMAGES, STYLE, images)
    settings = LoraTrainSettings(model=str(BUILTIN_DIR), images=str(images), out=args.out,
                                 base_model=BUILTIN_NAME, **{**RECIPE, "steps": args.steps})
    trainer = LoraTrainer(settings, work / "checkpoints", progress=not args.no_progress, checkpoint_every_s=120)
    if not trainer.run(None if args.budget_minutes is None else args.budget_minutes * 60):
        return 3
    trainer.export(Path(args.out), torch.float16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
