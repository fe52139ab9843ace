"""TINY_DECODER previews: a TAESD-style tiny autoencoder's decoder (diffusers ``AutoencoderTiny``).

A tiny decoder draws a full-resolution preview for a few percent of a VAE
decode, where APPROX_RGB gives one colour per latent pixel. It is optional and
model-specific (TAESD for SD 1.x/2.x latents, TAESDXL for SDXL's): a model
directory may ship one as ``preview_decoder/`` (an ``AutoencoderTiny`` in
diffusers layout), or the server is given one (``--preview-decoder``). It runs
in PyTorch on the backend's device whatever the backend, as the safety
checker does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffusiond.errors import FailedPrecondition
from diffusiond.pipeline.previews import to_uint8_images

log = logging.getLogger(__name__)

MODEL_SUBDIR = "preview_decoder"


class TinyDecoder:
    """Decodes the model's scaled latents into [B, H, W, 3] uint8 preview images."""

    def __init__(self, decoder: torch.nn.Module, scaling_factor: float, latent_channels: int, source: str) -> None:
        self._decoder = decoder
        self.scaling_factor = scaling_factor
        self.latent_channels = latent_channels
        self.source = source

    @classmethod
    def load(cls, path: Path, device: torch.device, latent_channels: int) -> TinyDecoder:
        """An ``AutoencoderTiny`` directory; FailedPrecondition naming the problem when it is not one."""
        from diffusers import AutoencoderTiny

        if not (path / "config.json").is_file():
            raise FailedPrecondition(f"preview decoder {path} has no config.json (expected an AutoencoderTiny)")
        try:
            model = AutoencoderTiny.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise FailedPrecondition(f"preview decoder {path} is not a loadable AutoencoderTiny: {exc}") from None
        channels = int(model.config.latent_channels)
        if channels != latent_channels:
            raise FailedPrecondition(
                f"preview decoder {path} decodes {channels}-channel latents; the model has {latent_channels}"
            )
        decoder = model.decoder.to(device).eval()
        log.info("loaded the preview decoder %s", path)
        return cls(decoder, float(model.config.scaling_factor), channels, str(path))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[B, C, h, w] scaled latents (the UNet's space, which TAESD-style decoders take) -> images."""
        weight = next(self._decoder.parameters())
        decoded = self._decoder(latents.to(weight.device, weight.dtype) / self.scaling_factor)
        return to_uint8_images(decoded.float().clamp(-1, 1))


def find(model_dir: Path, override: Path | None) -> Path | None:
    """The preview decoder to use: ``override`` (a server flag), else the model's ``preview_decoder/``."""
    if override is not None:
        return override
    shipped = model_dir / MODEL_SUBDIR
    return shipped if shipped.is_dir() else None
