"""Pipeline results and progress -> protobuf messages.

Generate and StreamProgress build their results with the same function, so a
request's images are the same bytes whichever RPC carried them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.models.registry import LoadedModel
from diffusiond.pipeline.imageio import PREVIEW_JPEG_QUALITY, encode_image
from diffusiond.pipeline.previews import fit_preview
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, ImageFormat, PreviewKind, StepInfo
from diffusiond.server.result_cache import CachedResult

_DTYPES = {
    np.dtype("float32"): pb.DATA_TYPE_FLOAT32,
    np.dtype("float16"): pb.DATA_TYPE_FLOAT16,
}


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """Row-major, little-endian bytes plus shape and dtype."""
    dtype = _DTYPES[array.dtype]
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=little.tobytes())


def png_parameters(request: GenerationRequest, seed: int) -> str:
    """Generation parameters embedded in PNGs, so an image file says how to make it again."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(
        f"Steps: {request.steps}, Sampler: {request.scheduler}, CFG scale: {request.guidance_scale:g}, "
        f"Seed: {seed}, Size: {request.width}x{request.height}, Model: {request.model}"
    )
    return "\n".join(lines)


def response_for(result: GenerationResult, model: LoadedModel) -> pb.GenerateResponse:
    request = result.request
    images = []
    for index, (pixels, seed) in enumerate(zip(result.images_uint8(), result.seeds)):
        text = {"parameters": png_parameters(request, seed)} if request.output_format is ImageFormat.PNG else None
        images.append(
            pb.Image(
                data=encode_image(pixels, request.output_format, request.quality, text),
                mime_type=request.output_format.mime_type,
                width=request.width,
                height=request.height,
                seed=seed,
                index=index,
            )
        )
    t = result.timings
    timings = pb.Timings(
        queue_s=t.queue_s, text_encode_s=t.text_encode_s, denoise_s=t.denoise_s, decode_s=t.decode_s, total_s=t.total_s
    )
    return _response(request, model, images, timings, result.warnings)


def cached_response(request: GenerationRequest, model: LoadedModel, cached: CachedResult) -> pb.GenerateResponse:
    """A result-cache hit: the cached images under this request's id; nothing ran, so timings are zero."""
    return _response(request, model, cached.images, pb.Timings(), cached.warnings, from_cache=True)


def _response(
    request: GenerationRequest,
    model: LoadedModel,
    images: Sequence[pb.Image],
    timings: pb.Timings,
    warnings: Sequence[str],
    from_cache: bool = False,
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request.request_id,
        images=images,
        seed=request.seed,
        model=model.name,
        backend=model.backend.name,
        scheduler=request.scheduler,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        timings=timings,
        warnings=warnings,
        from_cache=from_cache,
    )


def step_message(info: StepInfo, request: GenerationRequest) -> pb.Step:
    step = pb.Step(
        step=info.step,
        total_steps=info.total_steps,
        timestep=info.timestep,
        elapsed_s=info.elapsed_s,
        eta_s=info.eta_s,
    )
    if info.preview is None:
        return step
    if info.preview_kind is PreviewKind.LATENT:
        step.latents.CopyFrom(tensor_to_proto(info.preview))
        return step
    for index, pixels in enumerate(info.preview):
        image = fit_preview(pixels, request.width, request.height, request.preview.max_size)
        step.previews.append(
            pb.Image(
                data=encode_image(image, ImageFormat.JPEG, PREVIEW_JPEG_QUALITY),
                mime_type=ImageFormat.JPEG.mime_type,
                width=image.width,
                height=image.height,
                seed=request.image_seeds()[index],
                index=index,
            )
        )
    return step


def started_message(request: GenerationRequest, model: LoadedModel, total_steps: int) -> pb.Started:
    return pb.Started(
        model=model.name,
        backend=model.backend.name,
        total_steps=total_steps,
        seed=request.seed,
        width=request.width,
        height=request.height,
        scheduler=request.scheduler,
    )


def model_info(model: LoadedModel, is_default: bool) -> pb.ModelInfo:
    limits = model.limits
    return pb.ModelInfo(
        name=model.name,
        backend=model.backend.name,
        source=model.source,
        device=str(model.backend.device),
        dtype=model.backend.dtype_name,
        default_width=limits.default_width,
        default_height=limits.default_height,
        default_steps=limits.default_steps,
        default_guidance_scale=limits.default_guidance_scale,
        default_scheduler=model.schedulers.default_name,
        schedulers=model.schedulers.names,
        min_size=limits.min_size,
        max_size=limits.max_size,
        size_multiple=limits.size_multiple,
        max_steps=limits.max_steps,
        max_images=limits.max_images,
        latent_channels=model.config.latent_channels,
        latent_scaling_factor=model.config.scaling_factor,
        is_default=is_default,
    )
