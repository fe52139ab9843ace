"""Encoding finished images and previews into PNG, JPEG or WebP bytes.

Encoding is deterministic: the same pixels and parameters give the same bytes,
which is what makes Generate and StreamProgress results byte-identical.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from diffusiond.pipeline.request import ImageFormat

PREVIEW_JPEG_QUALITY = 80


def encode_image(
    pixels: np.ndarray | Image.Image,
    fmt: ImageFormat,
    quality: int = 90,
    text: dict[str, str] | None = None,
) -> bytes:
    """Encode [H, W, 3] uint8 pixels; ``text`` becomes PNG text chunks (ignored for other formats)."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if fmt is ImageFormat.PNG:
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_itxt(key, value)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt is ImageFormat.JPEG:
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt is ImageFormat.WEBP:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"unknown image format {fmt}")
    return buffer.getvalue()
