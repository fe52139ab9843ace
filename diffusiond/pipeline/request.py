"""The validated request the pipeline runs, and what it hands back.

These are plain dataclasses, free of protobuf, so the pipeline can be driven
from the gRPC servicer, a benchmark or a test alike.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

import numpy as np

SEED_MODULUS = 2**64


class PreviewKind(enum.Enum):
    NONE = "none"
    LATENT = "latent"
    APPROX_RGB = "approx_rgb"
    FULL = "full"
    TINY_DECODER = "tiny_decoder"


class Upscaler(enum.Enum):
    """How a hi-res pass enlarges the first pass's result."""

    LATENT_BICUBIC = "latent_bicubic"  # bicubic interpolation of the latents: no VAE round trip
    LANCZOS = "lanczos"  # decode, Lanczos-resize the pixels, encode again


class ImageFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"


@dataclass(frozen=True)
class PreviewSpec:
    kind: PreviewKind = PreviewKind.NONE
    every_n_steps: int = 1
    max_size: int = 0  # 0: the image's own size

    def due(self, step: int, total: int) -> bool:
        """Whether 1-based ``step`` of ``total`` carries a preview (the last one always does)."""
        if self.kind is PreviewKind.NONE:
            return False
        return step == total or step % max(self.every_n_steps, 1) == 0


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """A ControlNet's part in a request: which one, its control image, and how strongly and when it steers.

    ``image`` is the control image at the request's width and height, uint8
    [H, W, 3] (a canny map is already computed). The residuals the ControlNet
    adds to the UNet are multiplied by ``scale`` during the steps whose
    fraction of the schedule lies in [``guidance_start``, ``guidance_end``]
    and by 0 outside them, as diffusers' ``control_guidance_start/end`` do.
    """

    name: str
    image: np.ndarray
    scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def key(self) -> tuple[object, ...]:
        """Everything of it that decides the images (the image by its hash), for the result cache."""
        digest = hashlib.sha256(np.ascontiguousarray(self.image).tobytes()).hexdigest()
        return (self.name, self.image.shape, digest, self.scale, self.guidance_start, self.guidance_end)

    def scale_at(self, step_index: int, total_steps: int) -> float:
        """The conditioning scale of 0-based step ``step_index`` (diffusers' ``controlnet_keep``)."""
        outside = step_index / total_steps < self.guidance_start or (step_index + 1) / total_steps > self.guidance_end
        return 0.0 if outside else self.scale


@dataclass(frozen=True)
class ImageInput:
    """img2img / inpainting inputs: decoded, checked and fitted to the request's width and height.

    The pixel arrays are left out of comparisons and hashes; ``digest`` (of the
    bytes the client sent) stands for them in cache keys and logs.
    """

    pixels: np.ndarray = field(compare=False, repr=False)  # [height, width, 3] uint8
    strength: float  # the share of the steps that run: int(steps * strength), as in diffusers
    digest: str
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # [height, width] uint8, 255 = repaint
    mask_blur: int = 0  # Gaussian radius already applied to ``mask``, in pixels
    keep_unmasked: bool = False  # paste the unmasked pixels back over the result

    @property
    def inpainting(self) -> bool:
        return self.mask is not None


@dataclass(frozen=True)
class HiresSpec:
    """A second pass at a larger size: img2img over the upscaled first pass."""

    width: int
    height: int
    steps: int
    strength: float
    upscaler: Upscaler = Upscaler.LATENT_BICUBIC


@dataclass(frozen=True)
class GenerationRequest:
    """A request whose every field has been validated against its model's limits."""

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
    output_format: ImageFormat = ImageFormat.PNG
    quality: int = 90
    preview: PreviewSpec = field(default_factory=PreviewSpec)
    init: ImageInput | None = None  # img2img / inpainting
    hires: HiresSpec | None = None  # a second pass at a larger size

    @property
    def output_width(self) -> int:
        """The result's width: the hi-res pass's when there is one."""
        return self.hires.width if self.hires is not None else self.width

    @property
    def output_height(self) -> int:
        return self.hires.height if self.hires is not None else self.height
    # Step caching: the full UNet every ``cache_interval`` steps, only its shallow blocks (those
    # above ``cache_depth`` up blocks) in between; 1 runs the full UNet at every step (exact).
    cache_interval: int = 1
    cache_depth: int = 1
    # LoRA adapters: (name, scale) pairs sorted by name, zero scales dropped (so a scale of 0 is
    # exactly the base model); () for none. Requests with different sets never share a UNet call.
    adapters: tuple[tuple[str, float], ...] = ()
    control: ControlSpec | None = None  # a ControlNet steers the UNet (None: none)

    @property
    def caches_steps(self) -> bool:
        return self.cache_interval > 1

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only for scales above 1 (as in diffusers)."""
        return self.guidance_scale > 1.0

    def image_seeds(self) -> list[int]:
        """Image i uses seed + i (mod 2^64): it can be reproduced alone with that seed."""
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]

    @property
    def controlnet(self) -> str:
        """The ControlNet's name, "" without one."""
        return "" if self.control is None else self.control.name

    def latent_group(self) -> tuple[object, ...]:
        """Requests with equal groups can share a UNet call: same model, latent shape, adapter set and ControlNet.

        Steps, scheduler, guidance, seed and prompts may differ: every row carries
        its own timestep and every request keeps its own scheduler. Image inputs
        travel in each request's own state, so they do not split groups either;
        nor do the control image, scale and guidance window: they are per row.
        Adapters are fused into the UNet's weights, so one call runs one adapter
        set; a request without a ControlNet and one with another ControlNet run
        other networks. This is the group of the first pass: a hi-res request
        changes group for its second pass (see ``service.batcher``).
        """
        return (self.model, self.width, self.height, self.adapters, self.controlnet)

    def static_group(self) -> tuple[object, ...]:
        """What static batching (start together, finish together) also requires: the same timesteps."""
        strength = None if self.init is None else self.init.strength
        return (self.model, self.width, self.height, self.adapters, self.steps, self.scheduler, strength, self.hires,
                self.controlnet)


@dataclass
class Timings:
    queue_s: float = 0.0
    text_encode_s: float = 0.0
    image_encode_s: float = 0.0  # VAE-encoding the init image (and masked image)
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class GenerationResult:
    """Float RGB images in [0, 1], shape [num_images, height, width, 3]."""

    request: GenerationRequest
    images: np.ndarray
    seeds: list[int]
    timings: Timings
    warnings: list[str] = field(default_factory=list)
    filtered: list[bool] = field(default_factory=list)  # per image: withheld by the safety checker (black)

    def images_uint8(self) -> np.ndarray:
        """The same rounding diffusers uses when it makes PIL images."""
        return (self.images * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class StartInfo:
    total_steps: int


@dataclass(frozen=True)
class StepInfo:
    """One finished denoising step, and its preview if one was due."""

    step: int  # 1-based
    total_steps: int
    timestep: float
    elapsed_s: float
    eta_s: float
    preview_kind: PreviewKind = PreviewKind.NONE
    # LATENT: [num_images, C, h, w] float32. APPROX_RGB / FULL: [num_images, H, W, 3] uint8.
    preview: np.ndarray | None = None
    # The pixel size of the pass this step belongs to (a hi-res pass is larger than the request's).
    width: int = 0
    height: int = 0
