"""``diffusiond train-lora``: its arguments and the command (the trainer is ``lora_train``, imported on use
so that the CLI's other commands do not import torch)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin", help="diffusers-format model directory (or 'builtin')")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="training images; each one's caption is the .txt file beside it (else empty)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the adapter to write (.safetensors)")
    parser.add_argument("--work", default="", metavar="DIR",
                        help="checkpoints, for resuming (default: FILE's name + .work beside it)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (default: the rank)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="all", choices=["attention", "all"],
                        help="attention: attention and feed-forward layers; all: also the ResNet convolutions")
    parser.add_argument("--fp16", action="store_true", help="store the adapter's weights in fp16 (half the size)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop (checkpointed) after this many minutes; run again to resume")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--base-model-name", default="", help="the base model's name recorded in the adapter")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusiond.models.sources import resolve_model_dir
    from diffusiond.training.lora_train import LoraTrainer, LoraTrainSettings

    model_dir = resolve_model_dir(args.model)
    out = Path(args.out)
    settings = LoraTrainSettings(
        model=str(model_dir), images=args.images, out=str(out), rank=args.rank, alpha=args.alpha, steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, seed=args.seed, targets=args.targets,
        base_model=args.base_model_name or (args.model if args.model == "builtin" else model_dir.name),
    )
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    trainer = LoraTrainer(settings, work, progress=not args.no_progress,
                          checkpoint_every_s=args.checkpoint_minutes * 60)
    finished = trainer.run(None if args.budget_minutes is None else args.budget_minutes * 60)
    if not finished:
        return 3
    trainer.export(out, torch.float16 if args.fp16 else torch.float32)
    return 0
