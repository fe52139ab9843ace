"""The validated request the pipeline runs, and what it hands back.

These are plain dataclasses, free of protobuf, so the pipeline can be driven
from the gRPC servicer, a benchmark or a test alike.
"""

from __future__ import annotations

import enum
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

    def latent_group(self) -> tuple[object, ...]:
        """Requests with equal groups can share a UNet call: same model, latent shape and adapter set.

        Steps, scheduler, guidance, seed and prompts may differ: every row carries
        its own timestep and every request keeps its own scheduler. Image inputs
        travel in each request's own state, so they do not split groups either.
        Adapters are fused into the UNet's weights, so one call runs one adapter set.
        This is the group of the first pass: a hi-res request changes group for
        its second pass (see ``service.batcher``).
        """
        return (self.model, self.width, self.height, self.adapters)

    def static_group(self) -> tuple[object, ...]:
        """What static batching (start together, finish together) also requires: the same timesteps."""
        strength = None if self.init is None else self.init.strength
        return (self.model, self.width, self.height, self.adapters, self.steps, self.scheduler, strength, self.hires)


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
