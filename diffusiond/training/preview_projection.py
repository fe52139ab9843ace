"""The built-in model's APPROX_RGB projection, fitted on its own training data and shipped with it.

    python -m diffusiond.training.preview_projection --model diffusiond/models/builtin_weights

A generic fit (``diffusiond.models.latent_rgb.fit``) encodes procedural images;
the built-in model only ever draws shapes-data-set scenes, so fitting on
renders of the training split matches what its previews show a little better
(BENCHMARKS.md, "Previews"). Training's export writes the file; this command
refits an existing model directory without retraining.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

from diffusiond.errors import DiffusiondError, FailedPrecondition
from diffusiond.models import latent_rgb
from diffusiond.training import dataset

log = logging.getLogger(__name__)

FIT_SCENES = 256  # training-split scenes rendered for the fit
FIT_SEED = 0


def source_label(count: int = FIT_SCENES) -> str:
    return f"least squares over {count} training renders decoded by this VAE"


def training_renders(count: int = FIT_SCENES, seed: int = FIT_SEED) -> torch.Tensor:
    """[count, 3, 64, 64] renders of the training split in [-1, 1], scene i placed with seed ``seed + i``."""
    scenes = dataset.split("train")[:count]
    images = [dataset.render(scene, dataset.place(scene, random.Random(seed + i))) for i, scene in enumerate(scenes)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fit_vae(vae: torch.nn.Module, images: torch.Tensor, source: str) -> latent_rgb.LatentRGB:
    """Least squares from ``vae``'s scaled latents of ``images`` to the colours its decodes show."""
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    device = next(vae.parameters()).device

    def encode(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device)).latent_dist.mean

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(device)).sample

    was_training = vae.training
    vae.eval()
    try:
        return latent_rgb.fit(encode, decode, float(config.scaling_factor), factor, int(config.latent_channels),
                              source=source, images=images)
    finally:
        vae.train(was_training)


def write_for_model(model_dir: Path, count: int = FIT_SCENES) -> latent_rgb.LatentRGB:
    """Fit the projection of ``model_dir``'s VAE (diffusers ``vae/``) and write its ``latent_rgb.json``."""
    from diffusers import AutoencoderKL

    if not (model_dir / "vae" / "config.json").is_file():
        raise FailedPrecondition(f"{model_dir} has no vae/config.json (a diffusers model directory is needed)")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    size = int(vae.config.sample_size)
    if size != dataset.IMAGE_SIZE:
        raise FailedPrecondition(f"{model_dir}'s VAE is for {size} px images; the shapes data set draws "
                                 f"{dataset.IMAGE_SIZE} px")
    projection = fit_vae(vae, training_renders(count), source_label(count))
    projection.write(model_dir / latent_rgb.MODEL_FILE)
    log.info("wrote %s", model_dir / latent_rgb.MODEL_FILE)
    return projection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusiond.training.preview_projection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a model directory trained on the shapes data set")
    parser.add_argument("--scenes", type=int, default=FIT_SCENES, help="training renders to fit on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            write_for_model(args.model, args.scenes)
    except DiffusiondError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
