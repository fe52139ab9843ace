"""What a client asked for -> a complete, validated ``GenerationRequest``.

``GenerationParams`` is a request as a client sends it: zero, empty or None
means "the model's default". ``resolve`` fills every default from the model,
checks every field against the model's limits, decodes and fits its image
inputs (``image_inputs``: after every cheap check) and draws a seed where none
was given, once, so the pipeline never sees an unset value. Every front door (the
gRPC servicer, warm-up, INT8 calibration, eval, the benchmarks) goes through
it, so a request means the same thing wherever it comes from. Every check
names the field and the allowed values, so a client can fix its request from
the message alone.
"""

from __future__ import annotations

import math
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diffusiond.backends.base import AdapterSet, AppliesAdapters, CachesDeepFeatures, HoldsFusedAdapters
from diffusiond.errors import AdapterMismatch, FailedPrecondition, InvalidArgument, NotFound, shown
from diffusiond.pipeline.request import GenerationRequest, ImageFormat, PreviewKind, PreviewSpec, Upscaler
from diffusiond.service import image_inputs
from diffusiond.service.control import ControlParams, resolve_control
from diffusiond.service.image_inputs import HiresParams

if TYPE_CHECKING:
    from diffusiond.service.models import LoadedModel

DEFAULT_QUALITY = 90
MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_PATTERN = re.compile(r"[!-~]+")  # printable ASCII, no spaces
RANDOM_SEED_BITS = 32  # random seeds stay short enough to read and type back
SEED_LIMIT = 2**64
MAX_LORA_SCALE = 2.0
MAX_LORAS = 8
LORA_SCALE_DECIMALS = 6  # scales arrive as float32: 0.8 is 0.800000011920929 on the wire


@dataclass(frozen=True)
class PreviewParams:
    kind: PreviewKind = PreviewKind.NONE
    every_n_steps: int = 0  # 0: every step
    max_size: int = 0  # 0: the image's own size


@dataclass(frozen=True)
class GenerationParams:
    """A request as the client sent it; 0 / "" / None select the model's default."""

    prompt: str
    negative_prompt: str = ""
    model: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 0
    scheduler: str = ""
    output_format: ImageFormat = ImageFormat.PNG
    quality: int = 0
    preview: PreviewParams = field(default_factory=PreviewParams)
    cache_interval: int = 0
    cache_depth: int = 0
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale), as the client listed them
    control: ControlParams | None = None  # a ControlNet steers the image (None: none)
    request_id: str = ""
    client: str = ""  # who asked (an auth token's name), for logs; not part of the request itself
    # Image inputs (img2img, inpainting) as encoded bytes, and a hi-res pass; see ``image_inputs``.
    init_image: bytes = field(default=b"", repr=False)
    strength: float | None = None
    mask_image: bytes = field(default=b"", repr=False)
    mask_blur: int = 0
    keep_unmasked: bool = False
    hires: HiresParams | None = None

    @property
    def has_images(self) -> bool:
        """Whether resolving it decodes images (worth doing off the event loop)."""
        return bool(self.init_image or self.mask_image)


def require_range(field_name: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field_name, f"must be between {low} and {high}, got {value}")


def require_size(field_name: str, value: int, low: int, high: int, multiple: int) -> None:
    if not low <= value <= high or value % multiple:
        raise InvalidArgument(
            field_name,
            f"must be a multiple of {multiple} (the model's latent factor) between {low} and {high}, got {value}",
        )


def check_request_id(request_id: str, field_name: str = "request_id") -> str:
    """A client's id, or a fresh one when it gave none.

    It appears in every log line about the request (``req=<id>``), so it is held to
    printable ASCII without spaces: nothing a client sends can forge a log line or a token.
    """
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidArgument(
            field_name,
            f"must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces "
            f"(got {len(request_id)} characters, not repeated here)",
        )
    return request_id


def resolve(params: GenerationParams, model: LoadedModel) -> GenerationRequest:
    """The complete request ``params`` asks of ``model``; InvalidArgument names the first bad field."""
    limits = model.limits
    request_id = check_request_id(params.request_id)
    if not params.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(name, f"must be at most {limits.max_prompt_chars} characters, got {len(text)}")

    image_inputs.check_image_fields(
        params.init_image, params.strength, params.mask_image, params.mask_blur, params.keep_unmasked, params.hires
    )
    check_image_support(params, model)
    decoded = image_inputs.decode_inputs(params.init_image, params.mask_image, limits.input_images)
    if decoded is not None and not params.width and not params.height:
        width, height = image_inputs.size_of_image(decoded.image.size, limits)
    else:
        width = params.width or limits.default_width
        height = params.height or limits.default_height
    steps = params.steps or limits.default_steps
    num_images = params.num_images or 1
    guidance = limits.default_guidance_scale if params.guidance_scale is None else params.guidance_scale
    quality = params.quality or DEFAULT_QUALITY
    preview_every = params.preview.every_n_steps or 1

    require_size("width", width, limits.min_size, limits.max_size, limits.size_multiple)
    require_size("height", height, limits.min_size, limits.max_size, limits.size_multiple)
    for name, value, low, high in (
        ("steps", steps, 1, limits.max_steps),
        ("num_images", num_images, 1, limits.max_images),
        ("quality", quality, 1, 100),
        ("preview.every_n_steps", preview_every, 1, limits.max_steps),
        ("preview.max_size", params.preview.max_size, 0, limits.max_preview_size),
    ):
        require_range(name, value, low, high)
    if not math.isfinite(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance}")
    require_range("guidance_scale", guidance, 0.0, limits.max_guidance_scale)
    if params.seed is not None and not 0 <= params.seed < SEED_LIMIT:
        raise InvalidArgument("seed", f"must be between 0 and 2^64 - 1, got {params.seed}")

    preview_kind = params.preview.kind
    projection = model.pipeline.latent_rgb
    if preview_kind is PreviewKind.APPROX_RGB and model.config.latent_channels != projection.channels:
        raise FailedPrecondition(
            f"preview.kind: PREVIEW_KIND_APPROX_RGB's projection ({projection.source}) takes "
            f"{projection.channels}-channel latents; model {model.name!r} has {model.config.latent_channels} "
            "(use PREVIEW_KIND_FULL or PREVIEW_KIND_LATENT)"
        )
    if preview_kind is PreviewKind.TINY_DECODER and model.pipeline.tiny_decoder is None:
        raise FailedPrecondition(
            f"preview.kind: model {model.name!r} has no tiny preview decoder (a preview_decoder/ directory, or the "
            "server's --preview-decoder); use PREVIEW_KIND_APPROX_RGB or PREVIEW_KIND_FULL"
        )

    hires = None if params.hires is None else image_inputs.hires_spec(params.hires, width, height, steps, limits)
    if preview_kind is PreviewKind.LATENT and model.pipeline.safety is not None:
        raise FailedPrecondition(
            "preview.kind: this server filters images with a safety checker, and raw latents would bypass it; "
            "use PREVIEW_KIND_APPROX_RGB or PREVIEW_KIND_FULL"
        )

    cache_interval, cache_depth = _step_cache(params, model)
    adapters = resolve_adapters(params.loras, model)
    control = None
    if params.control is not None:
        if cache_interval > 1:
            raise FailedPrecondition(
                "cache_interval: step caching does not run ControlNets; use cache_interval 1 with control"
            )
        if params.init_image or params.mask_image or hires is not None:
            raise FailedPrecondition(
                "control: a ControlNet runs with text to image only, not yet with init_image, mask_image or hires"
            )
        control = resolve_control(params.control, model.controlnets, model.name, width, height, limits.input_images)
    scheduler = model.schedulers.resolve(params.scheduler)
    init = None
    if decoded is not None:
        init = image_inputs.image_input(decoded, width, height, params.strength, params.mask_blur, params.keep_unmasked)
    seed = params.seed if params.seed is not None else secrets.randbits(RANDOM_SEED_BITS)
    return GenerationRequest(
        request_id=request_id,
        model=model.name,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        num_images=num_images,
        scheduler=scheduler,
        output_format=params.output_format,
        quality=quality,
        preview=PreviewSpec(preview_kind, preview_every, params.preview.max_size),
        init=init,
        hires=hires,
        cache_interval=cache_interval,
        cache_depth=cache_depth,
        adapters=adapters,
        control=control,
    )


def describe_adapters(adapters: AdapterSet) -> str:
    return ", ".join(f"{name}:{scale:g}" for name, scale in adapters) or "no adapters"


def resolve_adapters(loras: tuple[tuple[str, float], ...], model: LoadedModel) -> AdapterSet:
    """The request's adapter set: checked (names, scales, files), zero scales dropped, sorted by name.

    Unknown names are NotFound naming them; a file that is no LoRA or was made for another base model is
    AdapterFileError naming the file; adapters an exported model does not hold are AdapterMismatch saying
    what it holds.
    """
    if len(loras) > MAX_LORAS:
        raise InvalidArgument("loras", f"at most {MAX_LORAS} adapters per request, got {len(loras)}")
    seen: set[str] = set()
    pairs = []
    for i, (name, scale) in enumerate(loras):
        if not name:
            raise InvalidArgument(f"loras[{i}].name", "must not be empty")
        if name in seen:
            raise InvalidArgument(f"loras[{i}].name", f"adapter {shown(name)} is named twice")
        if not math.isfinite(scale) or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise InvalidArgument(f"loras[{i}].scale", f"must be between {-MAX_LORA_SCALE} and {MAX_LORA_SCALE}, "
                                  f"got {scale}")
        seen.add(name)
        scale = round(float(scale), LORA_SCALE_DECIMALS)
        if scale != 0.0:
            pairs.append((name, scale))
    requested: AdapterSet = tuple(sorted(pairs))
    backend = model.backend
    if isinstance(backend, HoldsFusedAdapters):
        fused = backend.fused_adapters
        if requested and requested != fused:
            raise AdapterMismatch(
                f"loras: model {model.name!r} is an export served by the {backend.name} backend with "
                f"{describe_adapters(fused)} fused into its weights; it cannot apply {describe_adapters(requested)}. "
                "Ask for exactly the fused adapters or none, or export the model with the adapters you need "
                "(diffusiond export onnx --lora NAME:SCALE)"
            )
        return requested
    if not loras:
        return ()
    if not isinstance(backend, AppliesAdapters):
        raise AdapterMismatch(f"loras: model {model.name!r} runs on the {backend.name} backend, which applies "
                              "no adapters")
    if model.adapters is None:
        raise NotFound(f"adapter {shown(loras[0][0])}: this server serves no adapters (start it with --lora-dir DIR)")
    for name, _ in loras:
        model.adapters.check(name)
    return requested


def check_image_support(params: GenerationParams, model: LoadedModel) -> None:
    """FailedPrecondition when the model cannot take the request's image inputs (see ``ImageSupport``)."""
    support = model.image_support
    needs_encoder = []
    if params.init_image:
        needs_encoder.append("init_image")
    if params.hires is not None and params.hires.upscaler is Upscaler.LANCZOS:
        needs_encoder.append("hires.upscaler UPSCALER_LANCZOS")
    if needs_encoder and not support.img2img:
        raise FailedPrecondition(
            f"{needs_encoder[0]}: model {model.name!r} has no VAE encoder (its export left out vae_encoder/), "
            "which image inputs need; re-export it with the encoder"
        )


def step_cache_depths(model: LoadedModel) -> tuple[int, ...]:
    """The step-cache depths ``model``'s backend can run (empty: it cannot cache steps)."""
    backend = model.backend
    return tuple(backend.step_cache_depths()) if isinstance(backend, CachesDeepFeatures) else ()


def preview_kinds(model: LoadedModel) -> tuple[PreviewKind, ...]:
    """The preview kinds ``model`` serves, the best live preview first: a tiny decoder's full-resolution
    image where it has one, else the projection (free), then a full decode, then raw latents."""
    kinds = [PreviewKind.APPROX_RGB, PreviewKind.FULL]
    if model.pipeline.tiny_decoder is not None:
        kinds.insert(0, PreviewKind.TINY_DECODER)
    if model.pipeline.safety is None:  # raw latents would bypass the content filter
        kinds.append(PreviewKind.LATENT)
    return tuple(kinds)


def _step_cache(params: GenerationParams, model: LoadedModel) -> tuple[int, int]:
    limits = model.limits
    interval = params.cache_interval or limits.default_cache_interval
    depth = params.cache_depth or limits.default_cache_depth
    require_range("cache_interval", interval, 1, limits.max_steps)
    if params.cache_depth < 0:
        raise InvalidArgument("cache_depth", f"must not be negative, got {params.cache_depth}")
    if interval == 1:
        return 1, depth
    depths = step_cache_depths(model)
    if not depths:
        raise FailedPrecondition(
            f"cache_interval: model {model.name!r} runs on the {model.backend.name} backend, which cannot cache "
            "steps; use cache_interval 1 (or 0 for the server's default)"
        )
    if depth not in depths:
        raise InvalidArgument("cache_depth", f"must be one of {', '.join(map(str, depths))} for this model, got {depth}")
    return interval, depth
