"""Protobuf request -> validated ``GenerationRequest``.

Every check names the field and the allowed values, so a client in any
language can fix its request from the message alone. Defaults (0 / unset)
resolve to the model's defaults here, once, so the pipeline never sees them.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Sequence
from typing import Any

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.models.registry import LoadedModel
from diffusiond.pipeline.previews import SD_LATENT_RGB
from diffusiond.pipeline.request import GenerationRequest, ImageFormat, PreviewKind, PreviewSpec

IMAGE_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}
PREVIEW_KINDS = {
    pb.PREVIEW_KIND_UNSPECIFIED: PreviewKind.NONE,
    pb.PREVIEW_KIND_LATENT: PreviewKind.LATENT,
    pb.PREVIEW_KIND_APPROX_RGB: PreviewKind.APPROX_RGB,
    pb.PREVIEW_KIND_FULL: PreviewKind.FULL,
}
DEFAULT_QUALITY = 90
MAX_REQUEST_ID_CHARS = 128
RANDOM_SEED_BITS = 32  # random seeds stay short enough to read and type back


def require_range(field: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")


def require_size(field: str, value: int, low: int, high: int, multiple: int) -> None:
    if not low <= value <= high or value % multiple:
        raise InvalidArgument(
            field, f"must be a multiple of {multiple} (the model's latent factor) between {low} and {high}, got {value}"
        )


REQUEST_ID_METADATA_KEY = "x-request-id"


def request_id_of(msg: pb.GenerateRequest, metadata: Sequence[tuple[str, Any]] = ()) -> str:
    """The request's id: the field, else the ``x-request-id`` call metadata (as tracing
    proxies set it), else a fresh one. Checked first so every error can carry it."""
    field, rid = "request_id", msg.request_id
    if not rid:
        field = f"metadata {REQUEST_ID_METADATA_KEY}"
        rid = next((str(v) for k, v in metadata if k == REQUEST_ID_METADATA_KEY), "")
    if not rid:
        return uuid.uuid4().hex
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidArgument(field, f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return rid


def to_generation_request(msg: pb.GenerateRequest, model: LoadedModel, request_id: str) -> GenerationRequest:
    limits = model.limits
    if not msg.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field in ("prompt", "negative_prompt"):
        text = getattr(msg, field)
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(field, f"must be at most {limits.max_prompt_chars} characters, got {len(text)}")

    width = msg.width or limits.default_width
    height = msg.height or limits.default_height
    steps = msg.steps or limits.default_steps
    num_images = msg.num_images or 1
    guidance = msg.guidance_scale if msg.HasField("guidance_scale") else limits.default_guidance_scale
    quality = msg.quality or DEFAULT_QUALITY
    preview_every = msg.preview.every_n_steps or 1

    require_size("width", width, limits.min_size, limits.max_size, limits.size_multiple)
    require_size("height", height, limits.min_size, limits.max_size, limits.size_multiple)
    for field, value, low, high in (
        ("steps", steps, 1, limits.max_steps),
        ("num_images", num_images, 1, limits.max_images),
        ("quality", quality, 1, 100),
        ("preview.every_n_steps", preview_every, 1, limits.max_steps),
        ("preview.max_size", msg.preview.max_size, 0, limits.max_preview_size),
    ):
        require_range(field, value, low, high)
    if not math.isfinite(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance}")
    require_range("guidance_scale", guidance, 0.0, limits.max_guidance_scale)

    if msg.output_format not in IMAGE_FORMATS:
        raise InvalidArgument(
            "output_format", f"unknown value {msg.output_format}; use IMAGE_FORMAT_PNG, _JPEG or _WEBP"
        )
    if msg.preview.kind not in PREVIEW_KINDS:
        raise InvalidArgument(
            "preview.kind", f"unknown value {msg.preview.kind}; use PREVIEW_KIND_LATENT, _APPROX_RGB or _FULL"
        )

    preview_kind = PREVIEW_KINDS[msg.preview.kind]
    if preview_kind is PreviewKind.APPROX_RGB and model.config.latent_channels != SD_LATENT_RGB.shape[0]:
        raise FailedPrecondition(
            f"preview.kind: PREVIEW_KIND_APPROX_RGB needs {SD_LATENT_RGB.shape[0]}-channel latents; model "
            f"{model.name!r} has {model.config.latent_channels} (use PREVIEW_KIND_FULL or PREVIEW_KIND_LATENT)"
        )

    scheduler = model.schedulers.resolve(msg.scheduler)
    seed = msg.seed if msg.HasField("seed") else secrets.randbits(RANDOM_SEED_BITS)
    return GenerationRequest(
        request_id=request_id,
        model=model.name,
        prompt=msg.prompt,
        negative_prompt=msg.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        num_images=num_images,
        scheduler=scheduler,
        output_format=IMAGE_FORMATS[msg.output_format],
        quality=quality,
        preview=PreviewSpec(preview_kind, preview_every, msg.preview.max_size),
    )
