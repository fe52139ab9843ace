"""Protobuf messages <-> the service layer's domain objects, in both directions.

The one place that knows both: the servicer decodes requests and encodes
results and events here, and nothing below the server imports protobuf.
Enum values a client sends that this server does not know are refused here
(INVALID_ARGUMENT naming the field), since only the wire can carry them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.backends.base import HoldsFusedAdapters
from diffusiond.errors import InvalidArgument
from diffusiond.pipeline.request import ImageFormat, PreviewKind, Upscaler
from diffusiond.service.batcher import QueuedInfo
from diffusiond.service.control import ControlParams
from diffusiond.service.image_inputs import HiresParams
from diffusiond.service.models import LoadedModel
from diffusiond.service.outputs import EncodedImage, EncodedResult, StartedEvent, StepEvent
from diffusiond.service.resolver import (
    GenerationParams,
    PreviewParams,
    check_request_id,
    preview_kinds,
    step_cache_depths,
)

REQUEST_ID_METADATA_KEY = "x-request-id"

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
    pb.PREVIEW_KIND_TINY_DECODER: PreviewKind.TINY_DECODER,
}
UPSCALERS = {
    pb.UPSCALER_UNSPECIFIED: Upscaler.LATENT_BICUBIC,
    pb.UPSCALER_LATENT_BICUBIC: Upscaler.LATENT_BICUBIC,
    pb.UPSCALER_LANCZOS: Upscaler.LANCZOS,
}
_UPSCALER_TO_PROTO = {Upscaler.LATENT_BICUBIC: pb.UPSCALER_LATENT_BICUBIC, Upscaler.LANCZOS: pb.UPSCALER_LANCZOS}
_FORMAT_TO_PROTO = {ImageFormat.PNG: pb.IMAGE_FORMAT_PNG, ImageFormat.JPEG: pb.IMAGE_FORMAT_JPEG,
                    ImageFormat.WEBP: pb.IMAGE_FORMAT_WEBP}
_PREVIEW_TO_PROTO = {kind: value for value, kind in PREVIEW_KINDS.items()}
_TENSOR_DTYPES = {np.dtype("float32"): pb.DATA_TYPE_FLOAT32, np.dtype("float16"): pb.DATA_TYPE_FLOAT16}


# -- requests ---------------------------------------------------------------------------


def request_id_of(msg: pb.GenerateRequest, metadata: Sequence[tuple[str, Any]] = ()) -> str:
    """The request's id: the field, else the ``x-request-id`` call metadata (as tracing
    proxies set it), else a fresh one. Taken first, so every error can carry it."""
    if msg.request_id:
        return check_request_id(msg.request_id)
    rid = next((str(v) for k, v in metadata if k == REQUEST_ID_METADATA_KEY), "")
    return check_request_id(rid, f"metadata {REQUEST_ID_METADATA_KEY}")


def params_from_proto(msg: pb.GenerateRequest, request_id: str | None = None) -> GenerationParams:
    if msg.output_format not in IMAGE_FORMATS:
        raise InvalidArgument(
            "output_format", f"unknown value {msg.output_format}; use IMAGE_FORMAT_PNG, _JPEG or _WEBP"
        )
    if msg.preview.kind not in PREVIEW_KINDS:
        raise InvalidArgument(
            "preview.kind", f"unknown value {msg.preview.kind}; use PREVIEW_KIND_LATENT, _APPROX_RGB, _FULL or _TINY_DECODER"
        )
    if msg.hires.upscaler not in UPSCALERS:
        raise InvalidArgument(
            "hires.upscaler", f"unknown value {msg.hires.upscaler}; use UPSCALER_LATENT_BICUBIC or UPSCALER_LANCZOS"
        )
    return GenerationParams(
        request_id=msg.request_id if request_id is None else request_id,
        model=msg.model,
        prompt=msg.prompt,
        negative_prompt=msg.negative_prompt,
        width=msg.width,
        height=msg.height,
        steps=msg.steps,
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        num_images=msg.num_images,
        scheduler=msg.scheduler,
        output_format=IMAGE_FORMATS[msg.output_format],
        quality=msg.quality,
        preview=PreviewParams(PREVIEW_KINDS[msg.preview.kind], msg.preview.every_n_steps, msg.preview.max_size),
        init_image=msg.init_image,
        strength=msg.strength if msg.HasField("strength") else None,
        mask_image=msg.mask_image,
        mask_blur=msg.mask_blur,
        keep_unmasked=msg.keep_unmasked,
        hires=hires_from_proto(msg.hires) if msg.HasField("hires") else None,
        cache_interval=msg.cache_interval,
        cache_depth=msg.cache_depth,
        loras=tuple((ref.name, ref.scale) for ref in msg.loras),
        control=control_from_proto(msg.control) if msg.HasField("control") else None,
    )


def control_from_proto(msg: pb.ControlOptions) -> ControlParams:
    def optional(name: str) -> float | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return ControlParams(
        controlnet=msg.controlnet, image=msg.image, canny_from=msg.canny_from,
        canny_low=optional("canny_low"), canny_high=optional("canny_high"), scale=optional("scale"),
        guidance_start=optional("guidance_start"), guidance_end=optional("guidance_end"),
    )


def control_to_proto(control: ControlParams) -> pb.ControlOptions:
    msg = pb.ControlOptions(controlnet=control.controlnet, image=control.image, canny_from=control.canny_from)
    for name in ("canny_low", "canny_high", "scale", "guidance_start", "guidance_end"):
        value = getattr(control, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def hires_from_proto(msg: pb.HiresOptions) -> HiresParams:
    return HiresParams(
        scale=msg.scale,
        width=msg.width,
        height=msg.height,
        steps=msg.steps,
        strength=msg.strength if msg.HasField("strength") else None,
        upscaler=UPSCALERS[msg.upscaler],
    )


def params_to_proto(params: GenerationParams) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        request_id=params.request_id,
        model=params.model,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        num_images=params.num_images,
        scheduler=params.scheduler,
        output_format=_FORMAT_TO_PROTO[params.output_format],
        quality=params.quality,
        preview=pb.PreviewOptions(
            kind=_PREVIEW_TO_PROTO[params.preview.kind],
            every_n_steps=params.preview.every_n_steps,
            max_size=params.preview.max_size,
        ),
        cache_interval=params.cache_interval,
        cache_depth=params.cache_depth,
        loras=[pb.LoraRef(name=name, scale=scale) for name, scale in params.loras],
    )
    if params.guidance_scale is not None:
        msg.guidance_scale = params.guidance_scale
    if params.seed is not None:
        msg.seed = params.seed
    if params.control is not None:
        msg.control.CopyFrom(control_to_proto(params.control))
    msg.init_image = params.init_image
    msg.mask_image = params.mask_image
    msg.mask_blur = params.mask_blur
    msg.keep_unmasked = params.keep_unmasked
    if params.strength is not None:
        msg.strength = params.strength
    hires = params.hires
    if hires is not None:
        msg.hires.CopyFrom(pb.HiresOptions(scale=hires.scale, width=hires.width, height=hires.height,
                                           steps=hires.steps, upscaler=_UPSCALER_TO_PROTO[hires.upscaler]))
        if hires.strength is not None:
            msg.hires.strength = hires.strength
    return msg


# -- results ----------------------------------------------------------------------------


def image_to_proto(image: EncodedImage) -> pb.Image:
    return pb.Image(data=image.data, mime_type=image.mime_type, width=image.width, height=image.height,
                    seed=image.seed, index=image.index, filtered=image.filtered)


def response_to_proto(result: EncodedResult) -> pb.GenerateResponse:
    request, t = result.request, result.timings
    return pb.GenerateResponse(
        request_id=request.request_id,
        images=[image_to_proto(image) for image in result.images],
        seed=request.seed,
        model=result.model,
        backend=result.backend,
        scheduler=request.scheduler,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        timings=pb.Timings(queue_s=t.queue_s, text_encode_s=t.text_encode_s, denoise_s=t.denoise_s,
                           decode_s=t.decode_s, total_s=t.total_s, image_encode_s=t.image_encode_s),
        warnings=result.warnings,
        from_cache=result.from_cache,
    )


# -- progress events --------------------------------------------------------------------


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """Row-major, little-endian bytes plus shape and dtype."""
    dtype = _TENSOR_DTYPES[array.dtype]
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=little.tobytes())


def started_to_proto(event: StartedEvent) -> pb.Started:
    request = event.request
    return pb.Started(
        model=event.model,
        backend=event.backend,
        total_steps=event.total_steps,
        seed=request.seed,
        width=request.output_width,
        height=request.output_height,
        scheduler=request.scheduler,
    )


def step_to_proto(event: StepEvent) -> pb.Step:
    info = event.info
    step = pb.Step(
        step=info.step, total_steps=info.total_steps, timestep=info.timestep, elapsed_s=info.elapsed_s,
        eta_s=info.eta_s,
    )
    if info.preview is not None and info.preview_kind is PreviewKind.LATENT:
        step.latents.CopyFrom(tensor_to_proto(info.preview))
    step.previews.extend(image_to_proto(image) for image in event.images)
    return step


def event_to_proto(request_id: str, event: QueuedInfo | StartedEvent | StepEvent | EncodedResult) -> pb.ProgressEvent:
    if isinstance(event, QueuedInfo):
        return pb.ProgressEvent(request_id=request_id, queued=pb.Queued(position=event.position))
    if isinstance(event, StartedEvent):
        return pb.ProgressEvent(request_id=request_id, started=started_to_proto(event))
    if isinstance(event, StepEvent):
        return pb.ProgressEvent(request_id=request_id, step=step_to_proto(event))
    return pb.ProgressEvent(request_id=request_id, result=response_to_proto(event))


# -- models -----------------------------------------------------------------------------


def model_info(model: LoadedModel, is_default: bool) -> pb.ModelInfo:
    limits = model.limits
    support = model.image_support
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
        image_inputs=pb.ImageInputSupport(
            img2img=support.img2img,
            inpainting=support.inpainting,
            inpainting_method=support.inpainting_method,
            hires=support.hires,
            max_image_bytes=limits.input_images.max_bytes,
            max_image_pixels=limits.input_images.max_pixels,
        ),
        step_cache_depths=step_cache_depths(model),
        controlnets=[pb.ControlNetInfo(name=c.name, conditioning=c.conditioning) for c in model.controlnets.values()],
        default_cache_interval=limits.default_cache_interval,
        default_cache_depth=limits.default_cache_depth,
        preview_kinds=[_PREVIEW_TO_PROTO[kind] for kind in preview_kinds(model)],
        adapters=[
            pb.AdapterInfo(name=a.name, file=a.file, format=a.format, rank=a.rank, base_model=a.base_model,
                           layers=a.layers, size_bytes=a.size_bytes, error=a.error)
            for a in (model.adapters.describe() if model.adapters is not None else [])
        ],
        fused_adapters=[
            pb.LoraRef(name=name, scale=scale)
            for name, scale in (model.backend.fused_adapters if isinstance(model.backend, HoldsFusedAdapters) else ())
        ],
    )
