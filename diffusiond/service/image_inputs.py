"""A request's image inputs as the client sent them -> the checked ``ImageInput`` and ``HiresSpec`` it runs with.

The rules a client can rely on:

- **Size.** With an init image and neither width nor height given, the
  output has the init image's size (after EXIF orientation), scaled to lie
  within the model's minimum and maximum size and rounded down to its size
  multiple. Otherwise width and height are as given (0: the model's default).
- **Fitting.** An init image of another size is scaled, keeping its aspect
  ratio, until it covers the output size, and centre-cropped (Lanczos; the
  crop box is taken in the source, so an extreme aspect ratio never makes a
  huge intermediate image). The mask must have the init image's size and is
  fitted the same way, then blurred by ``mask_blur`` pixels.
- **Strength.** 0 to 1, taken to 6 decimals (a float32 0.7 on the wire means
  0.7); unset: 0.8 for img2img and 1.0 with a mask, diffusers' defaults.
- **Hi-res pass.** ``scale`` (default 2) or both ``width`` and ``height``;
  each side at least the first pass's and at most the model's maximum, a
  multiple of its size multiple (a scaled side is rounded down to one).
  Steps default to the request's, strength to 0.5, the upscaler to latent
  bicubic. Not with a mask: inpaint at the size you want.

Decoding (``image_decode``) happens after every cheap check, so a request with
a bad field is refused before its images cost anything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from diffusiond.errors import InvalidArgument
from diffusiond.pipeline.request import HiresSpec, ImageInput, Upscaler
from diffusiond.service.image_decode import ImageLimits, decode_image
from diffusiond.service.limits import ModelLimits

DEFAULT_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline
DEFAULT_INPAINT_STRENGTH = 1.0  # diffusers' StableDiffusionInpaintPipeline
DEFAULT_HIRES_SCALE = 2.0
DEFAULT_HIRES_STRENGTH = 0.5
MAX_MASK_BLUR = 64  # pixels
STRENGTH_DECIMALS = 6


@dataclass(frozen=True)
class HiresParams:
    """The hi-res pass as the client asked for it; 0 / None select the defaults."""

    scale: float = 0.0
    width: int = 0
    height: int = 0
    steps: int = 0
    strength: float | None = None
    upscaler: Upscaler = Upscaler.LATENT_BICUBIC


@dataclass(frozen=True)
class DecodedInputs:
    image: Image.Image  # RGB, as sent (after EXIF orientation)
    mask: Image.Image | None  # L, the image's size
    digest: str  # sha256 over both inputs' bytes


def check_strength(field: str, value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(field, f"must be between 0 and 1, got {value}")
    return round(float(value), STRENGTH_DECIMALS)


def check_image_fields(
    init_image: bytes, strength: float | None, mask_image: bytes, mask_blur: int, keep_unmasked: bool,
    hires: HiresParams | None,
) -> None:
    """The checks that need no decoding: fields that depend on others, and ranges."""
    if not init_image:
        for name, given in (("strength", strength is not None), ("mask_image", bool(mask_image))):
            if given:
                raise InvalidArgument(name, "needs init_image (the image to start from)")
    if not mask_image:
        for name, given in (("mask_blur", mask_blur != 0), ("keep_unmasked", keep_unmasked)):
            if given:
                raise InvalidArgument(name, "needs mask_image")
    if strength is not None:
        check_strength("strength", strength)
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise InvalidArgument("mask_blur", f"must be between 0 and {MAX_MASK_BLUR} pixels, got {mask_blur}")
    if hires is not None and mask_image:
        raise InvalidArgument("hires", "cannot be combined with mask_image; inpaint at the size you want instead")


def decode_inputs(init_image: bytes, mask_image: bytes, limits: ImageLimits) -> DecodedInputs | None:
    """The init image and mask, each checked before it is decoded (see ``image_decode``)."""
    if not init_image:
        return None
    image = decode_image(init_image, "init_image", limits)
    mask = None
    digest = hashlib.sha256()
    digest.update(len(init_image).to_bytes(8, "little") + init_image)
    if mask_image:
        mask = decode_image(mask_image, "mask_image", limits, mask=True)
        if mask.size != image.size:
            raise InvalidArgument(
                "mask_image", f"is {mask.width}x{mask.height}; it must have the init image's size, "
                f"{image.width}x{image.height}"
            )
        digest.update(len(mask_image).to_bytes(8, "little") + mask_image)
    return DecodedInputs(image, mask, digest.hexdigest())


def size_of_image(size: tuple[int, int], limits: ModelLimits) -> tuple[int, int]:
    """The output size an init image gives when the request names none (see the module docstring)."""
    width, height = size
    scale = min(1.0, limits.max_size / max(width, height))
    scale = max(scale, limits.min_size / min(width, height))
    m = limits.size_multiple

    def side(value: int) -> int:
        return min(max(int(value * scale) // m * m, limits.min_size), limits.max_size)

    return side(width), side(height)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover ``width`` x ``height`` keeping the aspect ratio, centre-cropped (Lanczos)."""
    if image.size == (width, height):
        return image
    source_w, source_h = image.size
    scale = max(width / source_w, height / source_h)
    crop_w, crop_h = width / scale, height / scale
    left, top = (source_w - crop_w) / 2, (source_h - crop_h) / 2
    return image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))


def image_input(
    decoded: DecodedInputs, width: int, height: int, strength: float | None, mask_blur: int, keep_unmasked: bool
) -> ImageInput:
    """The decoded inputs fitted to the output size, with their strength resolved."""
    if strength is None:
        strength = DEFAULT_INPAINT_STRENGTH if decoded.mask is not None else DEFAULT_STRENGTH
    mask = None
    if decoded.mask is not None:
        fitted = fit(decoded.mask, width, height)
        if mask_blur:
            fitted = fitted.filter(ImageFilter.GaussianBlur(mask_blur))
        mask = np.array(fitted, dtype=np.uint8)
    return ImageInput(
        pixels=np.array(fit(decoded.image, width, height), dtype=np.uint8),
        strength=check_strength("strength", strength),
        digest=decoded.digest,
        mask=mask,
        mask_blur=mask_blur,
        keep_unmasked=keep_unmasked,
    )


def hires_spec(params: HiresParams, width: int, height: int, steps: int, limits: ModelLimits) -> HiresSpec:
    """The hi-res pass over a first pass of ``width`` x ``height`` and ``steps`` steps."""
    m = limits.size_multiple
    if params.width or params.height:
        if params.scale:
            raise InvalidArgument("hires.scale", "give hires.scale or hires.width and hires.height, not both")
        if not (params.width and params.height):
            missing = "hires.height" if params.width else "hires.width"
            raise InvalidArgument(missing, "give both hires.width and hires.height (or hires.scale)")
        target_w, target_h = params.width, params.height
    else:
        scale = params.scale or DEFAULT_HIRES_SCALE
        if not math.isfinite(scale) or scale < 1.0:
            raise InvalidArgument("hires.scale", f"must be at least 1, got {scale}")
        target_w, target_h = int(width * scale) // m * m, int(height * scale) // m * m
        if max(target_w, target_h) > limits.max_size:
            raise InvalidArgument(
                "hires.scale", f"{scale:g} makes {target_w}x{target_h}, over the model's largest size {limits.max_size}"
            )
    for name, value, base in (("hires.width", target_w, width), ("hires.height", target_h, height)):
        if not base <= value <= limits.max_size or value % m:
            raise InvalidArgument(
                name, f"must be a multiple of {m} between the first pass's {base} and {limits.max_size}, got {value}"
            )
    hires_steps = params.steps or steps
    if not 1 <= hires_steps <= limits.max_steps:
        raise InvalidArgument("hires.steps", f"must be between 1 and {limits.max_steps}, got {hires_steps}")
    strength = DEFAULT_HIRES_STRENGTH if params.strength is None else params.strength
    return HiresSpec(
        width=target_w,
        height=target_h,
        steps=hires_steps,
        strength=check_strength("hires.strength", strength),
        upscaler=params.upscaler,
    )
