"""How much each preview kind looks like the final image, on the built-in model (or --model).

    .venv/bin/python bench/preview_fidelity.py [--model builtin] [--num-prompts 32] [--threads N]

Prompt i of the held-out test split with seed i, the model's defaults; the last
step's preview against the final image box-filtered to the preview's size
(``diffusiond.eval.preview_fidelity``). APPROX_RGB is measured twice, on the
same generations: with SD 1.x's factors (what every model got before
projections were fitted per model) and with the model's own projection. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusiond.eval.preview_fidelity import compare_projections, measure  # noqa: E402
from diffusiond.models.latent_rgb import SD_PROJECTION  # noqa: E402
from diffusiond.models.sources import ModelSource, resolve_model_dir  # noqa: E402
from diffusiond.pipeline.request import PreviewKind  # noqa: E402
from diffusiond.service.models import load_model  # noqa: E402
from diffusiond.training import dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 on a busy machine avoids spinning threads)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source = ModelSource.parse(args.model)
    model = load_model(source.name, resolve_model_dir(source.location))
    prompts = [scene.caption for scene in dataset.held_out_prompts(args.num_prompts)]
    seeds = list(range(len(prompts)))
    own = model.pipeline.latent_rgb
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| preview | size | PSNR (dB), mean | PSNR, worst | mean abs error (levels) |")
    print("|---|---|---:|---:|---:|", flush=True)
    # One generation per prompt serves both projections: the same clean latents, the same final image.
    runs = compare_projections(model, prompts, seeds, {"APPROX_RGB, SD 1.x factors": SD_PROJECTION,
                                                      f"APPROX_RGB, {own.source}": own})
    if model.pipeline.tiny_decoder is not None:
        runs["TINY_DECODER"] = measure(model, prompts, seeds, PreviewKind.TINY_DECODER)
    for label, results in runs.items():
        ratios = np.array([r.psnr_db for r in results])
        errors = np.array([r.mean_abs_error for r in results])
        width, height = results[0].preview_size
        print(f"| {label} | {width}x{height} | {ratios.mean():.1f} | {ratios.min():.1f} | {errors.mean():.1f} |",
              flush=True)
    model.backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
