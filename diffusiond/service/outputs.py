"""Finished images and previews, encoded into the bytes a client receives.

Encoding runs off the batcher's thread (image encoding must not hold up the
next denoising step of everyone else) and is deterministic: the same pixels
and parameters give the same bytes, which is what makes a request's images
identical whether they arrive by ``Generate`` or in the last event of
``StreamProgress``. These are the domain results the result cache stores and
every front door converts to its own wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusiond.pipeline.imageio import PREVIEW_JPEG_QUALITY, encode_image
from diffusiond.pipeline.previews import fit_preview
from diffusiond.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    ImageFormat,
    PreviewKind,
    StepInfo,
    Timings,
)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int  # the seed that reproduces this image alone
    index: int  # its position in the request
    filtered: bool = False  # withheld by the safety checker: the pixels are black


@dataclass(frozen=True)
class EncodedResult:
    """A finished request as a client receives it."""

    request: GenerationRequest
    model: str
    backend: str
    images: tuple[EncodedImage, ...]
    timings: Timings = field(default_factory=Timings)
    warnings: tuple[str, ...] = ()
    from_cache: bool = False

    @property
    def size_bytes(self) -> int:
        return sum(len(image.data) for image in self.images)


@dataclass(frozen=True)
class StartedEvent:
    """The request left the queue and its denoising begins."""

    request: GenerationRequest
    model: str
    backend: str
    total_steps: int  # UNet evaluations per image (PNDM runs one more than asked)


@dataclass(frozen=True)
class StepEvent:
    """A step's progress with its preview encoded (images) or kept as a tensor (latents)."""

    info: StepInfo
    images: tuple[EncodedImage, ...] = ()


def png_parameters(request: GenerationRequest, seed: int) -> str:
    """Generation parameters embedded in PNGs, so an image file says how to make it again."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = (
        f"Steps: {request.steps}, Sampler: {request.scheduler}, CFG scale: {request.guidance_scale:g}, "
        f"Seed: {seed}, Size: {request.width}x{request.height}, Model: {request.model}"
        + (f", Step cache: every {request.cache_interval} at depth {request.cache_depth}" if request.caches_steps else "")
    )
    if request.init is not None:
        settings += f", Denoising strength: {request.init.strength:g}"
        if request.init.inpainting:
            settings += f", Mask blur: {request.init.mask_blur}"
    if request.hires is not None:
        hires = request.hires
        settings += (f", Hires resize: {hires.width}x{hires.height}, Hires steps: {hires.steps}, "
                     f"Hires denoising strength: {hires.strength:g}, Hires upscaler: {hires.upscaler.value}")
    lines.append(settings)
    return "\n".join(lines)


def encode_result(result: GenerationResult, backend: str) -> EncodedResult:
    request = result.request
    images = []
    filtered = result.filtered or [False] * len(result.seeds)
    for index, (pixels, seed, withheld) in enumerate(zip(result.images_uint8(), result.seeds, filtered)):
        text = {"parameters": png_parameters(request, seed)} if request.output_format is ImageFormat.PNG else None
        images.append(
            EncodedImage(
                data=encode_image(pixels, request.output_format, request.quality, text),
                mime_type=request.output_format.mime_type,
                width=request.output_width,
                height=request.output_height,
                seed=seed,
                index=index,
                filtered=withheld,
            )
        )
    return EncodedResult(
        request=request,
        model=request.model,
        backend=backend,
        images=tuple(images),
        timings=result.timings,
        warnings=tuple(result.warnings),
    )


def encode_step(info: StepInfo, request: GenerationRequest) -> StepEvent:
    """APPROX_RGB / FULL previews become JPEGs at their pass's size, scaled to ``preview.max_size``;
    latents stay as they are."""
    if info.preview is None or info.preview_kind is PreviewKind.LATENT:
        return StepEvent(info)
    seeds = request.image_seeds()
    width, height = info.width or request.width, info.height or request.height
    images = []
    for index, pixels in enumerate(info.preview):
        image = fit_preview(pixels, width, height, request.preview.max_size)
        images.append(
            EncodedImage(
                data=encode_image(image, ImageFormat.JPEG, PREVIEW_JPEG_QUALITY),
                mime_type=ImageFormat.JPEG.mime_type,
                width=image.width,
                height=image.height,
                seed=seeds[index],
                index=index,
            )
        )
    return StepEvent(info, tuple(images))
