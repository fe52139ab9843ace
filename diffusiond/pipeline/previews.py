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

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusiond.errors import FailedPrecondition

# SD 1.x latent channels -> (R, G, B); the result lies in about [-1, 1].
SD_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


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


def approx_rgb(latents: torch.Tensor) -> np.ndarray:
    """[B, 4, h, w] scaled latents -> [B, h, w, 3] uint8 by the linear SD projection."""
    if latents.shape[1] != SD_LATENT_RGB.shape[0]:
        raise FailedPrecondition(
            f"APPROX_RGB previews need {SD_LATENT_RGB.shape[0]}-channel SD latents; this model has "
            f"{latents.shape[1]} channels (use PREVIEW_KIND_FULL or PREVIEW_KIND_LATENT)"
        )
    rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), SD_LATENT_RGB)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


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
