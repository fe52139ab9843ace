"""Client image bytes -> pixels, refusing whatever could hurt the server before any pixel is decoded.

An image a client sends is hostile until checked. In order:

1. its size in bytes (``--max-input-image-mb``), before PIL sees it;
2. its format, from its header only: PNG, JPEG or WebP (PIL tries no other
   decoder, so no rarely used and less hardened plug-in ever runs);
3. its declared pixel count (``--max-input-pixels``), still from the header,
   so a few-kilobyte "decompression bomb" that declares 30000 x 30000 pixels
   is refused before a byte of pixel memory is allocated;
4. decoding (of the first frame only), where truncated or corrupt data is a
   client error, not a server one;
5. EXIF orientation applied, then the mode made what the pipeline takes:
   RGB for images (transparency composited over white), L for masks
   (transparency over black, so an opaque stroke on a transparent layer marks
   what to repaint); palette, 16-bit, CMYK and the other modes are converted.

Every refusal is INVALID_ARGUMENT naming the field and the limit it broke.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusiond.errors import InvalidArgument, shown

log = logging.getLogger(__name__)

MIB = 1024 * 1024
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_IMAGE_BYTES = 8 * MIB
DEFAULT_MAX_PIXELS = 4096 * 4096
# PIL refuses images over twice its MAX_IMAGE_PIXELS (89.5 MP) by itself; a limit must stay below that.
PIL_HARD_LIMIT = 2 * 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageLimits:
    """What one input image may be, in bytes and in pixels (the server's ``--max-input-*`` flags)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError(f"max input image bytes must be at least 1024, got {self.max_bytes}")
        if not 64 * 64 <= self.max_pixels <= PIL_HARD_LIMIT:
            raise ValueError(f"max input pixels must be between {64 * 64} and {PIL_HARD_LIMIT}, got {self.max_pixels}")


def decode_image(data: bytes, field: str, limits: ImageLimits, mask: bool = False) -> Image.Image:
    """``data`` as an RGB image (an L image when ``mask``), or InvalidArgument naming ``field`` and why not."""
    if len(data) > limits.max_bytes:
        raise InvalidArgument(
            field, f"is {len(data)} bytes; the limit is {limits.max_bytes} bytes (--max-input-image-mb)"
        )
    image = _open(data, field, limits)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError...
        raise InvalidArgument(field, f"could not be decoded as {image.format}: {shown(exc)}") from None
    image = _apply_orientation(image, field)
    return _to_mode(image, "L" if mask else "RGB", background=0 if mask else 255)


def _open(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """The image with its header read and checked; no pixel decoded yet (``Image.open`` is lazy)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(field, "is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise InvalidArgument(
            field, f"declares more than {PIL_HARD_LIMIT} pixels; the limit is {limits.max_pixels} "
            "pixels (--max-input-pixels)"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidArgument(field, f"has a header that could not be read: {shown(exc)}") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise InvalidArgument(
            field, f"declares {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} "
            "pixels (--max-input-pixels)"
        )
    return image


def _apply_orientation(image: Image.Image, field: str) -> Image.Image:
    """Turn the pixels the way the EXIF orientation says (cameras store them sideways)."""
    try:
        return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as exc:  # a malformed EXIF block: the pixels are fine, their orientation unknown
        log.info("%s: EXIF orientation ignored: %s", field, exc)
        return image


def _to_mode(image: Image.Image, mode: str, background: int) -> Image.Image:
    """RGB or L from any mode PNG, JPEG or WebP decode to, compositing transparency over ``background``."""
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit grey: PIL's convert would clip, not scale
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        canvas = Image.new("RGBA", image.size, (background, background, background, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        image = canvas
    return image if image.mode == mode else image.convert(mode)
