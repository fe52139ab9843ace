"""Latent-to-RGB projections for APPROX_RGB previews: one per model, fitted to its own VAE.

A projection maps each pixel of a *scaled* latent (the UNet's space) linearly to
the colour of the image patch it decodes to, ``rgb = latent @ weights + bias``,
in [-1, 1]. Stable Diffusion 1.x's published factors are right for SD 1.x and
2.x only: any other VAE arranges its latent channels its own way (on the
built-in model SD's factors drew a pink field for a black background). Where a
model's projection comes from, first match wins:

1. ``latent_rgb.json`` in the model directory (the built-in model ships one,
   fitted when it was exported);
2. a VAE config recognised as SD 1.x/2.x's or SDXL's: their published factors;
3. the cache, ``cache_root()/latent_rgb/<digest of the VAE's files>.json``;
4. fitted now (a fraction of a second for small VAEs) and written to the cache.

Fitting is least squares over decoded latents: procedural images (flat
colours, shapes and gradients) are encoded, their latents decoded, and each
decoded image averaged over every latent pixel's patch is the target of that
latent pixel; so the projection predicts what the VAE itself would show.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusiond.errors import FailedPrecondition

log = logging.getLogger(__name__)

MODEL_FILE = "latent_rgb.json"

# Scaled SD 1.x/2.x latent channels -> (R, G, B) (the VAE SD 2.x kept); the result lies in about [-1, 1].
SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
# SDXL's VAE (scaling factor 0.13025), as ComfyUI's latent formats publish it.
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)
_SD_VAE_CHANNELS = [128, 256, 512, 512]

FIT_IMAGES = 32
FIT_LATENT_SIZE = 16  # latent pixels per side of each fitting image


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ weights + bias`` per latent pixel; ``source`` says where it came from."""

    weights: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""

    @property
    def channels(self) -> int:
        return len(self.weights)

    def project(self, latents: torch.Tensor) -> np.ndarray:
        """[B, C, h, w] scaled latents -> [B, h, w, 3] uint8."""
        if latents.shape[1] != self.channels:
            raise FailedPrecondition(
                f"this latent-to-RGB projection takes {self.channels}-channel latents, got {latents.shape[1]}"
            )
        weights = torch.tensor(self.weights, dtype=torch.float32)
        rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), weights) + torch.tensor(self.bias)
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    def to_json(self) -> dict[str, Any]:
        return {"weights": [list(row) for row in self.weights], "bias": list(self.bias), "source": self.source}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> LatentRGB:
        try:
            weights = tuple(tuple(float(v) for v in row) for row in values["weights"])
            bias = tuple(float(v) for v in values.get("bias", (0.0, 0.0, 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"{where}: not a latent-to-RGB projection ({exc!r})") from None
        if not weights or any(len(row) != 3 for row in weights) or len(bias) != 3:
            raise FailedPrecondition(f"{where}: weights must be [channels][3] and bias [3]")
        return cls(weights, bias, str(values.get("source", where)))  # type: ignore[arg-type]

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


SD_PROJECTION = LatentRGB(SD_FACTORS, source="Stable Diffusion 1.x/2.x factors")
SDXL_PROJECTION = LatentRGB(SDXL_FACTORS, SDXL_BIAS, source="SDXL factors")


def recognised(vae_config: dict[str, Any]) -> LatentRGB | None:
    """SD 1.x/2.x's or SDXL's published factors when the VAE config is theirs, else None."""
    if vae_config.get("latent_channels", 4) != 4 or list(vae_config.get("block_out_channels", [])) != _SD_VAE_CHANNELS:
        return None
    scaling = float(vae_config.get("scaling_factor", 0.18215))
    if abs(scaling - 0.18215) < 1e-6:
        return SD_PROJECTION
    if abs(scaling - 0.13025) < 1e-6:
        return SDXL_PROJECTION
    return None


def read_model_file(model_dir: Path) -> LatentRGB | None:
    path = model_dir / MODEL_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"{path} is not valid JSON: {exc}") from None
    return LatentRGB.from_json(values, str(path))


def vae_digest(model_dir: Path) -> str:
    """Identifies the VAE by its files (config and weights, encoder and decoder), for the cache."""
    h = hashlib.sha256()
    for sub in ("vae", "vae_decoder", "vae_encoder"):
        directory = model_dir / sub
        if not directory.is_dir():
            continue
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(model_dir)).encode())
            h.update(str(path.stat().st_size).encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def fitting_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: flat backgrounds with a rectangle, an ellipse and a gradient band,
    in colours drawn uniformly from the RGB cube, so every colour the decoder can draw has a say."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(4)]
        image = Image.new("RGB", (size, size), colours[0])
        draw = ImageDraw.Draw(image)
        for shape, colour in zip((draw.rectangle, draw.ellipse), colours[1:3]):
            x0, y0 = rng.uniform(0, 0.6, 2) * size
            w, h = rng.uniform(0.2, 0.5, 2) * size
            shape([x0, y0, x0 + w, y0 + h], fill=colour)
        pixels = np.asarray(image, dtype=np.float32)
        band = slice(int(size * 0.75), size)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
        pixels[band] = pixels[band] * (1 - ramp) + np.array(colours[3], dtype=np.float32) * ramp
        images.append(pixels)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def fit(
    encode: Callable[[torch.Tensor], torch.Tensor] | None,
    decode: Callable[[torch.Tensor], torch.Tensor],
    scaling_factor: float,
    vae_scale_factor: int,
    latent_channels: int,
    source: str,
    count: int = FIT_IMAGES,
    latent_size: int = FIT_LATENT_SIZE,
    images: torch.Tensor | None = None,
) -> LatentRGB:
    """Least-squares projection from scaled latents to the colours their decodes show.

    ``encode`` / ``decode`` work on unscaled latents and images in [-1, 1]. The images encoded are
    ``images`` (e.g. the model's own training data) or procedural ones (``fitting_images``); without
    an encoder the latents are standard normal draws (a backend without a VAE encoder): a rougher fit.
    """
    size = latent_size * vae_scale_factor
    with torch.no_grad():
        if encode is not None:
            pictures = images if images is not None else fitting_images(count, size)
            latents = torch.cat([encode(chunk).float().cpu() for chunk in pictures.split(8)])
            scaled = latents * scaling_factor
        else:
            g = torch.Generator().manual_seed(0)
            scaled = torch.randn(count, latent_channels, latent_size, latent_size, generator=g)
        decoded = torch.cat([decode(chunk / scaling_factor).float().cpu() for chunk in scaled.split(8)])
    target = F.avg_pool2d(decoded.clamp(-1, 1), vae_scale_factor)  # [N, 3, h, w]: each latent pixel's patch
    x = scaled.permute(0, 2, 3, 1).reshape(-1, scaled.shape[1]).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [C + 1, 3]
    weights = tuple(tuple(round(float(v), 6) for v in row) for row in solution[:-1])
    bias = tuple(round(float(v), 6) for v in solution[-1])
    return LatentRGB(weights, bias, source)  # type: ignore[arg-type]
