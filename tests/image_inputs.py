"""Input images for the tests: encoded test pictures, masks, and hostile files made byte by byte."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    """A shapes-like test picture: a plain background, a square, and some texture."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = (30, 70, 220)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    noise = rng.integers(-20, 21, size=pixels.shape)
    return np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)


def box_mask(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (8, 8, 40, 40)) -> np.ndarray:
    """255 (repaint) inside ``box`` = (left, top, right, bottom), 0 elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return mask


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _deflate_repeated(piece: bytes, times: int) -> bytes:
    """A zlib stream of ``piece`` repeated ``times`` times, compressing ``piece`` once: each copy is a
    run of non-final deflate blocks that refers to nothing before it, so the copies simply follow
    each other, closed by an empty final block and the checksum of the whole."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    blocks = compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(times):
        checksum = zlib.adler32(piece, checksum)
    return b"\x78\x9c" + blocks * times + b"\x03\x00" + struct.pack(">I", checksum)


def bomb_png(side: int) -> bytes:
    """A valid ``side`` x ``side`` all-black 1-bit PNG of about side**2 / 8000 bytes.

    Deflate compresses at most about 1000:1, so this is as small as such a PNG gets;
    decoded, PIL would hold ``side**2`` bytes (and three times that as RGB).
    """
    rows = 1000
    if side % rows:
        raise ValueError(f"side must be a multiple of {rows}")
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the bits
    body = _deflate_repeated(row * rows, side // rows)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
