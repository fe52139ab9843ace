"""Experiment: continue a finished built-in-model run's diffusion stage for more steps, then export.

    .venv/bin/python bench/continue_training.py --from runs/builtin --steps 900 --out /tmp/continued
    .venv/bin/diffusiond eval --model continued=/tmp/continued --num-prompts 200

Answers "would more diffusion steps alone reach the quality targets?" without
retraining from scratch: the finished run's checkpoint is copied into a new
work directory and relabelled as the ``builtin`` recipe with
``diffusion_steps`` raised by ``--steps`` (so its cosine learning-rate
schedule stretches to the new length), then training resumes at the old
final step. The result is an experiment, not a reproducible recipe run:
``make train-builtin`` cannot produce it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusiond.training.recipe import RECIPES  # noqa: E402
from diffusiond.training.train import CHECKPOINT, LATENT_POOL, Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="work directory of a finished builtin run")
    parser.add_argument("--steps", type=int, required=True, help="diffusion steps to add")
    parser.add_argument("--work", default="/tmp/diffusiond-continued", help="new work directory")
    parser.add_argument("--out", required=True, help="where to write the continued model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source, work = Path(args.source), Path(args.work)
    state = torch.load(source / CHECKPOINT, map_location="cpu", weights_only=False)
    if state["stage"] != "done":
        parser.error(f"{source} is not a finished run (stage {state['stage']})")
    base = RECIPES["builtin"]
    recipe = base.replace(diffusion_steps=base.diffusion_steps + args.steps)
    work.mkdir(parents=True, exist_ok=True)
    state.update(recipe=recipe.fingerprint(), stage="diffusion", step=base.diffusion_steps)
    torch.save(state, work / CHECKPOINT)
    shutil.copy(source / LATENT_POOL, work / LATENT_POOL)

    trainer = Trainer(recipe, work, checkpoint_every_s=300.0)
    trainer.run()
    trainer.export(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
