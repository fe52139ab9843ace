from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]

class PreviewKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREVIEW_KIND_UNSPECIFIED: _ClassVar[PreviewKind]
    PREVIEW_KIND_LATENT: _ClassVar[PreviewKind]
    PREVIEW_KIND_APPROX_RGB: _ClassVar[PreviewKind]
    PREVIEW_KIND_FULL: _ClassVar[PreviewKind]
    PREVIEW_KIND_TINY_DECODER: _ClassVar[PreviewKind]

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]

class Upscaler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPSCALER_UNSPECIFIED: _ClassVar[Upscaler]
    UPSCALER_LATENT_BICUBIC: _ClassVar[Upscaler]
    UPSCALER_LANCZOS: _ClassVar[Upscaler]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
PREVIEW_KIND_UNSPECIFIED: PreviewKind
PREVIEW_KIND_LATENT: PreviewKind
PREVIEW_KIND_APPROX_RGB: PreviewKind
PREVIEW_KIND_FULL: PreviewKind
PREVIEW_KIND_TINY_DECODER: PreviewKind
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
UPSCALER_UNSPECIFIED: Upscaler
UPSCALER_LATENT_BICUBIC: Upscaler
UPSCALER_LANCZOS: Upscaler

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HiresOptions(_message.Message):
    __slots__ = ("scale", "width", "height", "steps", "strength", "upscaler")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    UPSCALER_FIELD_NUMBER: _ClassVar[int]
    scale: float
    width: int
    height: int
    steps: int
    strength: float
    upscaler: Upscaler
    def __init__(self, scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., strength: _Optional[float] = ..., upscaler: _Optional[_Union[Upscaler, str]] = ...) -> None: ...

class PreviewOptions(_message.Message):
    __slots__ = ("kind", "every_n_steps", "max_size")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    kind: PreviewKind
    every_n_steps: int
    max_size: int
    def __init__(self, kind: _Optional[_Union[PreviewKind, str]] = ..., every_n_steps: _Optional[int] = ..., max_size: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "scheduler", "output_format", "quality", "preview", "init_image", "strength", "mask_image", "mask_blur", "keep_unmasked", "hires", "cache_interval", "cache_depth", "loras", "control")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNMASKED_FIELD_NUMBER: _ClassVar[int]
    HIRES_FIELD_NUMBER: _ClassVar[int]
    CACHE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    output_format: ImageFormat
    quality: int
    preview: PreviewOptions
    init_image: bytes
    strength: float
    mask_image: bytes
    mask_blur: int
    keep_unmasked: bool
    hires: HiresOptions
    cache_interval: int
    cache_depth: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraRef]
    control: ControlOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., scheduler: _Optional[str] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask_image: _Optional[bytes] = ..., mask_blur: _Optional[int] = ..., keep_unmasked: _Optional[bool] = ..., hires: _Optional[_Union[HiresOptions, _Mapping]] = ..., cache_interval: _Optional[int] = ..., cache_depth: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraRef, _Mapping]]] = ..., control: _Optional[_Union[ControlOptions, _Mapping]] = ...) -> None: ...

class LoraRef(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class ControlOptions(_message.Message):
    __slots__ = ("controlnet", "image", "canny_from", "canny_low", "canny_high", "scale", "guidance_start", "guidance_end")
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CANNY_FROM_FIELD_NUMBER: _ClassVar[int]
    CANNY_LOW_FIELD_NUMBER: _ClassVar[int]
    CANNY_HIGH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_START_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_END_FIELD_NUMBER: _ClassVar[int]
    controlnet: str
    image: bytes
    canny_from: bytes
    canny_low: float
    canny_high: float
    scale: float
    guidance_start: float
    guidance_end: float
    def __init__(self, controlnet: _Optional[str] = ..., image: _Optional[bytes] = ..., canny_from: _Optional[bytes] = ..., canny_low: _Optional[float] = ..., canny_high: _Optional[float] = ..., scale: _Optional[float] = ..., guidance_start: _Optional[float] = ..., guidance_end: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "seed", "index", "filtered")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    index: int
    filtered: bool
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ..., filtered: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "text_encode_s", "denoise_s", "decode_s", "total_s", "image_encode_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    DENOISE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    text_encode_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    image_encode_s: float
    def __init__(self, queue_s: _Optional[float] = ..., text_encode_s: _Optional[float] = ..., denoise_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., total_s: _Optional[float] = ..., image_encode_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "images", "seed", "model", "backend", "scheduler", "steps", "guidance_scale", "timings", "warnings", "from_cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    seed: int
    model: str
    backend: str
    scheduler: str
    steps: int
    guidance_scale: float
    timings: Timings
    warnings: _containers.RepeatedScalarFieldContainer[str]
    from_cache: bool
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., scheduler: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ..., from_cache: _Optional[bool] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("request_id", "queued", "started", "step", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    started: Started
    step: Step
    result: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("model", "backend", "total_steps", "seed", "width", "height", "scheduler")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    total_steps: int
    seed: int
    width: int
    height: int
    scheduler: str
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., total_steps: _Optional[int] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., scheduler: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step", "total_steps", "timestep", "elapsed_s", "eta_s", "previews", "latents")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    timestep: float
    elapsed_s: float
    eta_s: float
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    latents: Tensor
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timestep: _Optional[float] = ..., elapsed_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "backend", "source", "device", "dtype", "default_width", "default_height", "default_steps", "default_guidance_scale", "default_scheduler", "schedulers", "min_size", "max_size", "size_multiple", "max_steps", "max_images", "latent_channels", "latent_scaling_factor", "is_default", "image_inputs", "step_cache_depths", "default_cache_interval", "default_cache_depth", "adapters", "fused_adapters", "preview_kinds", "controlnets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    LATENT_SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CACHE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CACHE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    FUSED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_KINDS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    source: str
    device: str
    dtype: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    default_scheduler: str
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    min_size: int
    max_size: int
    size_multiple: int
    max_steps: int
    max_images: int
    latent_channels: int
    latent_scaling_factor: float
    is_default: bool
    image_inputs: ImageInputSupport
    step_cache_depths: _containers.RepeatedScalarFieldContainer[int]
    default_cache_interval: int
    default_cache_depth: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    fused_adapters: _containers.RepeatedCompositeFieldContainer[LoraRef]
    preview_kinds: _containers.RepeatedScalarFieldContainer[PreviewKind]
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetInfo]
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., source: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_scheduler: _Optional[str] = ..., schedulers: _Optional[_Iterable[str]] = ..., min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., size_multiple: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_images: _Optional[int] = ..., latent_channels: _Optional[int] = ..., latent_scaling_factor: _Optional[float] = ..., is_default: _Optional[bool] = ..., image_inputs: _Optional[_Union[ImageInputSupport, _Mapping]] = ..., step_cache_depths: _Optional[_Iterable[int]] = ..., default_cache_interval: _Optional[int] = ..., default_cache_depth: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., fused_adapters: _Optional[_Iterable[_Union[LoraRef, _Mapping]]] = ..., preview_kinds: _Optional[_Iterable[_Union[PreviewKind, str]]] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetInfo, _Mapping]]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "file", "format", "rank", "base_model", "layers", "size_bytes", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    format: str
    rank: int
    base_model: str
    layers: int
    size_bytes: int
    error: str
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ..., format: _Optional[str] = ..., rank: _Optional[int] = ..., base_model: _Optional[str] = ..., layers: _Optional[int] = ..., size_bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ControlNetInfo(_message.Message):
    __slots__ = ("name", "conditioning")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    name: str
    conditioning: str
    def __init__(self, name: _Optional[str] = ..., conditioning: _Optional[str] = ...) -> None: ...

class ImageInputSupport(_message.Message):
    __slots__ = ("img2img", "inpainting", "inpainting_method", "hires", "max_image_bytes", "max_image_pixels")
    IMG2IMG_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_METHOD_FIELD_NUMBER: _ClassVar[int]
    HIRES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    img2img: bool
    inpainting: bool
    inpainting_method: str
    hires: bool
    max_image_bytes: int
    max_image_pixels: int
    def __init__(self, img2img: _Optional[bool] = ..., inpainting: _Optional[bool] = ..., inpainting_method: _Optional[str] = ..., hires: _Optional[bool] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
