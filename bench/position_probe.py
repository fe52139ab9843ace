"""Does a model tell position words apart? Two probes, on the text encoder and on the UNet.

    .venv/bin/python bench/position_probe.py [--model DIR] [--timestep 800]

1. Text encoder: the largest L2 distance, over token positions, between the
   encodings of two prompts that differ only in position ("top left" against
   "bottom right") and of two that differ only in colour. Near zero for the
   position pair means the encoder has collapsed the position words together.
2. UNet: from one noise latent at ``--timestep``, the predicted clean image
   (x0) for "a large red square on a blue background, <position>" at five
   positions, decoded; the centroid of its red. A model that follows position
   puts the five centroids near the grid centres (18, 32 or 46 pixels on each
   axis); one that ignores position gives the same centroid five times.

BENCHMARKS.md ("The built-in model (v2)") quotes both for training runs D and E.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusiond.models.builtin import ensure_builtin_model  # noqa: E402

POSITIONS = ("top left", "top right", "in the center", "bottom left", "bottom right")
TEMPLATE = "a large {colour} square on a blue background, {position}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers-format model directory (default: the built-in)")
    parser.add_argument("--timestep", type=int, default=800)
    args = parser.parse_args()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = Path(args.model or ensure_builtin_model())
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    with torch.inference_mode():
        pair = encode([TEMPLATE.format(colour="red", position=p) for p in ("top left", "bottom right")])
        colours = encode([TEMPLATE.format(colour=c, position="top left") for c in ("red", "green")])
        print(f"text encoder: position pair {(pair[0] - pair[1]).norm(dim=-1).max():.2f} apart, "
              f"colour pair {(colours[0] - colours[1]).norm(dim=-1).max():.2f}")

        context = encode([TEMPLATE.format(colour="red", position=p) for p in POSITIONS])
        side = unet.config.sample_size
        noise = torch.randn(1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        ab = scheduler.alphas_cumprod[args.timestep]
        sample = noise.expand(len(POSITIONS), -1, -1, -1)
        out = unet(sample, torch.full((len(POSITIONS),), args.timestep), encoder_hidden_states=context).sample
        if scheduler.config.prediction_type == "v_prediction":
            x0 = ab.sqrt() * sample - (1 - ab).sqrt() * out
        else:
            x0 = (sample - (1 - ab).sqrt() * out) / ab.sqrt()
        images = vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)
    red = images[:, 0] - images[:, 2]  # red minus blue: the shape, not the background
    ys, xs = torch.meshgrid(torch.arange(red.shape[1], dtype=torch.float32),
                            torch.arange(red.shape[2], dtype=torch.float32), indexing="ij")
    print(f"x0 at t={args.timestep}, centroid of the red (x, y) in pixels:")
    for position, r in zip(POSITIONS, red):
        weight = (r + 2).clamp(min=0) ** 4
        print(f"  {position:14s} {float((weight * xs).sum() / weight.sum()):5.1f} "
              f"{float((weight * ys).sum() / weight.sum()):5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
