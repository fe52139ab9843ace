"""The autoencoder's ceiling: how often the scorer reads a real render right after a VAE round trip.

    .venv/bin/python bench/autoencoder_readback.py [--model DIR] [--num-scenes 200]

Held-out scene i, placed with seed i, rendered, encoded to the latent mean and
decoded by the model's own VAE, then read by the pixel scorer. No UNet can draw
what its autoencoder cannot: an attribute read wrong here is lost before the
diffusion model is involved (the reason the built-in model's latents are 16x16).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusiond.eval.scorer import ATTRIBUTES, Scores, score_image  # noqa: E402
from diffusiond.models.builtin import ensure_builtin_model  # noqa: E402
from diffusiond.training import dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers-format model directory (default: the built-in)")
    parser.add_argument("--num-scenes", type=int, default=200)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(args.model or ensure_builtin_model()) / "vae").eval()
    scenes = dataset.held_out_prompts(args.num_scenes)
    renders = np.stack([dataset.render(s, dataset.place(s, random.Random(i))) for i, s in enumerate(scenes)])
    with torch.inference_mode():
        x = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(50)])
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    original = Scores.tally(score_image(r, s) for r, s in zip(renders, scenes))
    round_trip = Scores.tally(score_image(im, s) for im, s in zip(images, scenes))
    print("| images | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---:|" * len(ATTRIBUTES))
    for label, scores in (("renders", original), ("after the VAE round trip", round_trip)):
        print(f"| {label} | " + " | ".join(f"{scores.accuracy(a):.1%}" for a in ATTRIBUTES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
