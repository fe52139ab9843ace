"""gRPC transport settings: compression and message-size limits.

The largest message the server sends is a ``GenerateResponse`` (or the
``result`` event of a stream) holding ``max_images`` images of
``max_size`` x ``max_size`` pixels. PNG is the worst case: random pixels do not
compress, so a PNG is the raw 3 bytes per pixel plus about 0.3 % (a filter
byte per row, deflate block headers, chunk headers) plus its text chunk (the
prompt and negative prompt, at most 2 x 4096 characters of up to 4 bytes
each). JPEG (at most 0.66 of raw at quality 100) and WebP (0.37) are smaller.
Step events are smaller still: a latent preview is 4 channels x (size / 8)^2
float32 values per image, 1/12 of the raw RGB bytes; APPROX_RGB and FULL
previews are JPEGs of quality 80 at most the image's size.

So the send limit defaults to

    max_images * (max_size^2 * 3 * 1.01 + 64 KiB) + 1 MiB

with max_size at least 1024 (models whose native size exceeds ``--max-size``
still produce it), which is 98 MiB for the defaults (8 images of 2048 x 2048).

The largest message the server receives is a ``GenerateRequest`` with two
input images (init and mask) of at most ``--max-input-image-mb`` each, plus
its text (at most about 40 KiB). So the receive limit defaults to

    2 * max_input_image_bytes + 1 MiB

which is 17 MiB for the default 8 MiB per image. A smaller limit would refuse
requests whose images pass every check of their own, with a transport error
that names no field; the server warns when it is given one.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

COMPRESSION: dict[str, grpc.Compression] = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
}
MIB = 1024 * 1024
INPUT_IMAGES_PER_REQUEST = 2  # init image and mask
PNG_OVERHEAD = 1.01  # measured 1.003 on random pixels; rounded up
PER_IMAGE_OVERHEAD_BYTES = 64 * 1024  # PNG text chunk (prompts) and protobuf fields
PER_MESSAGE_OVERHEAD_BYTES = MIB
# Models whose native size exceeds --max-size (e.g. SDXL's 1024) may still produce it.
LARGEST_NATIVE_SIZE = 1024


def largest_response_bytes(max_size: int, max_images: int) -> int:
    """An upper bound on the bytes of any message the server sends (see the module docstring)."""
    per_image = math.ceil(max_size * max_size * 3 * PNG_OVERHEAD) + PER_IMAGE_OVERHEAD_BYTES
    return max_images * per_image + PER_MESSAGE_OVERHEAD_BYTES


def largest_request_bytes(max_input_image_bytes: int) -> int:
    """An upper bound on the bytes of any request that passes the input image limit (see the module docstring)."""
    return INPUT_IMAGES_PER_REQUEST * max_input_image_bytes + PER_MESSAGE_OVERHEAD_BYTES


def compression_named(name: str) -> grpc.Compression:
    try:
        return COMPRESSION[name.lower()]
    except KeyError:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSION)}, got {name!r}") from None


def server_options(max_send_bytes: int, max_receive_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
    ]
