"""Live previews: the predicted clean latent, and cheap ways to look at it.

Previews show the *predicted clean image* x0 (what the image would be if
denoising stopped now), which is far more legible than the noisy latent. x0 is
computed from the scaled model input, which every diffusers scheduler puts in
the same (DDPM) space, and the cumulative alpha of the current step:

    x0 = (x_in - sqrt(1 - a) * eps) / sqrt(a)        (epsilon prediction)
    x0 = sqrt(a) * x_in - sqrt(1 - a) * v            (v prediction)

Sigma-based schedulers (Euler, LMS, DPM++, UniPC) give a via a = 1 / (1 + sigma^2).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusiond.errors import FailedPrecondition
from diffusiond.models import latent_rgb
from diffusiond.models.builtin import cache_root
from diffusiond.models.config import ModelConfig, read_vae_config

log = logging.getLogger(__name__)


def load_projection(model_dir: Path, config: ModelConfig, backend: Any) -> latent_rgb.LatentRGB:
    """The model's latent-to-RGB projection: shipped, recognised, cached, or fitted now and cached."""
    shipped = latent_rgb.read_model_file(model_dir)
    if shipped is not None:
        return shipped
    known = latent_rgb.recognised(read_vae_config(model_dir))
    if known is not None:
        return known
    cached = cache_root() / "latent_rgb" / f"{latent_rgb.vae_digest(model_dir)}.json"
    if cached.is_file():
        try:
            return latent_rgb.LatentRGB.from_json(json.loads(cached.read_text(encoding="utf-8")), str(cached))
        except (FailedPrecondition, json.JSONDecodeError):
            log.warning("ignoring the unreadable cached projection %s; fitting anew", cached)
    started = time.perf_counter()
    source = f"fitted to {model_dir.name}'s VAE"

    def encode(images: torch.Tensor) -> torch.Tensor:
        return backend.vae_encode(images.to(backend.device))

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return backend.vae_decode(latents.to(backend.device))

    fit = (config.scaling_factor, config.vae_scale_factor, config.latent_channels)
    if config.has_vae_encoder:
        projection = latent_rgb.fit(encode, decode, *fit, source=source)
    else:  # an export without a VAE encoder: decode standard normal latents instead
        log.info("fitting %s's preview projection on random latents: the model has no VAE encoder", model_dir)
        projection = latent_rgb.fit(None, decode, *fit, source=source + " (random latents)")
    try:
        projection.write(cached)
    except OSError as exc:  # a read-only cache costs a fit per load, nothing more
        log.warning("could not cache the latent-to-RGB projection at %s: %s", cached, exc)
    log.info("fitted a latent-to-RGB projection for %s in %.2fs", model_dir, time.perf_counter() - started)
    return projection


def alpha_bar(scheduler: Any, timestep: torch.Tensor) -> float:
    """Cumulative alpha at the scheduler's current step (call before ``scheduler.step``)."""
    sigmas = getattr(scheduler, "sigmas", None)
    step_index = getattr(scheduler, "step_index", None)
    if sigmas is not None and step_index is not None and step_index < len(sigmas):
        sigma = float(sigmas[step_index])
        return 1.0 / (1.0 + sigma * sigma)
    t = int(round(float(timestep)))
    t = min(max(t, 0), len(scheduler.alphas_cumprod) - 1)
    return float(scheduler.alphas_cumprod[t])


def predicted_clean_latent(
    scheduler: Any, timestep: torch.Tensor, model_input: torch.Tensor, model_output: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    a = alpha_bar(scheduler, timestep)
    sqrt_a, sqrt_1ma = a**0.5, (1.0 - a) ** 0.5
    if prediction_type == "v_prediction":
        return sqrt_a * model_input - sqrt_1ma * model_output
    if prediction_type == "sample":
        return model_output
    return (model_input - sqrt_1ma * model_output) / sqrt_a


def approx_rgb(latents: torch.Tensor, projection: latent_rgb.LatentRGB) -> np.ndarray:
    """[B, C, h, w] scaled latents -> [B, h, w, 3] uint8 by the model's linear projection."""
    return projection.project(latents)


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (images * 255).round().astype(np.uint8)


def fit_preview(image: np.ndarray, width: int, height: int, max_size: int) -> Image.Image:
    """Scale a preview to the image's aspect at the image size, capped at ``max_size`` on its long side."""
    target_w, target_h = width, height
    if max_size and max(width, height) > max_size:
        scale = max_size / max(width, height)
        target_w, target_h = max(1, round(width * scale)), max(1, round(height * scale))
    pil = Image.fromarray(image)
    if pil.size != (target_w, target_h):
        pil = pil.resize((target_w, target_h), Image.Resampling.BILINEAR)
    return pil
