"""How close two renderings of one request must be: the one definition the tests share.

A request's noise, prompt encodings, scheduler steps and VAE decode are its
own, so they are exact whatever else runs. The UNet is not: on the CPU its
convolution and matrix-multiply kernels round differently for different batch
sizes (and batch positions), so image i of a batch and the same image made
alone, or in another batch, may differ by a few 8-bit levels after the
denoising loop (measured: at most 3 after 20 steps). Far from a different picture.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffusiond.eval.compare import psnr

ALONE_VS_BATCH_MAX_LEVELS = 6
ALONE_VS_BATCH_MIN_PSNR_DB = 38.0


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_image(a: bytes, b: bytes) -> None:
    """``a`` and ``b`` are the same picture up to batch-dependent kernel rounding."""
    x, y = pixels(a).astype(float), pixels(b).astype(float)
    assert x.shape == y.shape
    worst = np.abs(x - y).max()
    assert worst <= ALONE_VS_BATCH_MAX_LEVELS, f"pixels differ by up to {worst} levels"
    assert psnr(x, y) >= ALONE_VS_BATCH_MIN_PSNR_DB
