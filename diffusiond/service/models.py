"""Loading models into ready pipelines, warming them up, and finding them by name."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from diffusiond.backends import registry as backends
from diffusiond.backends.base import AppliesAdapters, Backend, BackendSettings
from diffusiond.backends.torch_eager import TorchEagerBackend
from diffusiond.errors import FailedPrecondition, NotFound, shown
from diffusiond.models.config import ModelConfig, load_model_config
from diffusiond.pipeline import tiny_decoder
from diffusiond.pipeline.previews import load_projection
from diffusiond.pipeline.safety import SafetyChecker
from diffusiond.pipeline.schedulers import SchedulerFactory
from diffusiond.pipeline.text import PromptEncoder
from diffusiond.pipeline.text2img import Text2ImagePipeline
from diffusiond.pipeline.tiny_decoder import TinyDecoder
from diffusiond.service import control
from diffusiond.service.adapters import AdapterLibrary, ModelAdapters
from diffusiond.service.image_decode import ImageLimits
from diffusiond.service.limits import ModelLimits
from diffusiond.service.resolver import GenerationParams, resolve

log = logging.getLogger(__name__)

INPAINT_BY_UNET = "unet"  # a 9-channel inpainting UNet takes the mask and masked image
INPAINT_BY_BLENDING = "latent_blend"  # a 4-channel UNet; the kept area is reset every step


@dataclass(frozen=True)
class ImageSupport:
    """Which image inputs a model takes (ListModels reports it)."""

    img2img: bool  # init_image: needs the VAE encoder
    inpainting: bool  # mask_image
    inpainting_method: str  # INPAINT_BY_UNET or INPAINT_BY_BLENDING; "" without inpainting
    hires: bool  # the latent upscaler needs nothing more; the Lanczos one needs img2img

    @classmethod
    def of(cls, config: ModelConfig) -> ImageSupport:
        encoder = config.has_vae_encoder
        method = INPAINT_BY_UNET if config.inpainting_unet else INPAINT_BY_BLENDING
        return cls(img2img=encoder, inpainting=encoder, inpainting_method=method if encoder else "", hires=True)


@dataclass
class LoadedModel:
    name: str
    source: str
    config: ModelConfig
    backend: Backend
    pipeline: Text2ImagePipeline
    limits: ModelLimits
    adapters: ModelAdapters | None = None  # LoRA adapters from --lora-dir, where the backend applies them
    controlnets: dict[str, control.ControlNetInfo] = field(default_factory=dict)

    @property
    def schedulers(self) -> SchedulerFactory:
        return self.pipeline.schedulers

    @property
    def image_support(self) -> ImageSupport:
        return ImageSupport.of(self.config)


def load_tokenizer(model_dir: Path):
    from transformers import CLIPTokenizer

    path = model_dir / "tokenizer"
    if not path.is_dir():
        raise FailedPrecondition(f"{model_dir} has no tokenizer/ directory")
    return CLIPTokenizer.from_pretrained(path)


def load_model(
    name: str,
    model_dir: Path,
    backend_name: str = "torch",
    settings: BackendSettings | None = None,
    max_size: int = 2048,
    prompt_cache_size: int = 256,
    input_images: ImageLimits | None = None,
    safety_checker: Path | None = None,
    default_cache_interval: int = 1,
    default_cache_depth: int = 1,
    preview_decoder: Path | None = None,
    lora_library: AdapterLibrary | None = None,
    controlnets: dict[str, Path] | None = None,
) -> LoadedModel:
    """Load a model directory onto a backend and wrap it in the shared pipeline (with a content filter
    from ``safety_checker`` when given; it runs on the backend's device, in PyTorch), with ``controlnets``
    (name -> directory) attached; the built-in model gets the shipped canny ControlNet unless named.
    TINY_DECODER previews use ``preview_decoder`` when given, else the model directory's
    ``preview_decoder/`` where it has one."""
    config = load_model_config(model_dir)
    if config.inpainting_unet and not config.has_vae_encoder:
        raise FailedPrecondition(
            f"{model_dir}: an inpainting UNet needs the VAE encoder for every request (also text to image), "
            "and this model has none; export it with vae_encoder/"
        )
    tokenizer = load_tokenizer(model_dir)
    backend = backends.create_backend(backend_name, model_dir, settings or BackendSettings())
    prompts = PromptEncoder(tokenizer, backend, config.text_max_length, cache_size=prompt_cache_size)
    safety = SafetyChecker.load(safety_checker, backend.device) if safety_checker is not None else None
    projection = load_projection(model_dir, config, backend)
    tiny_path = tiny_decoder.find(model_dir, preview_decoder)
    tiny = TinyDecoder.load(tiny_path, backend.device, config.latent_channels) if tiny_path is not None else None
    adapters = None
    if lora_library is not None and isinstance(backend, AppliesAdapters):
        adapters = lora_library.for_model(name, backend.adapter_weight_shapes(), backend.device)
    pipeline = Text2ImagePipeline(
        backend, prompts, SchedulerFactory(config.scheduler_config), config, safety, adapters,
        latent_rgb=projection, tiny_decoder=tiny,
    )
    limits = ModelLimits.for_model(
        config, max_size=max_size, input_images=input_images or ImageLimits(),
        default_cache_interval=default_cache_interval, default_cache_depth=default_cache_depth,
    )
    model = LoadedModel(name, str(model_dir), config, backend, pipeline, limits, adapters=adapters)
    for controlnet_name in control.carried(backend):  # exports carry theirs
        model.controlnets[controlnet_name] = control.carried_info(controlnet_name, model_dir)
    attached = dict(controlnets or {})
    if not attached and _is_builtin(model_dir) and control.BUILTIN_CONTROLNET_DIR.is_dir():
        if isinstance(backend, TorchEagerBackend):  # other backends serve the built-in model without it
            attached[control.BUILTIN_CONTROLNET_NAME] = control.BUILTIN_CONTROLNET_DIR
    for controlnet_name, path in attached.items():
        model.controlnets[controlnet_name] = control.attach(backend, controlnet_name, Path(path))
    support = model.image_support
    log.info(
        "loaded model %s from %s on %s (%s, %s); native size %d, default scheduler %s; image inputs: %s",
        name, model_dir, backend.name, backend.device, backend.dtype_name,
        config.default_size, pipeline.schedulers.default_name,
        f"img2img, inpainting by {support.inpainting_method}, hi-res" if support.img2img
        else "hi-res (latent upscaler) only: no VAE encoder",
    )
    if default_cache_interval > 1:  # the server's default must work for this model
        resolve(GenerationParams(prompt="check", request_id="startup"), model)
    return model


def _is_builtin(model_dir: Path) -> bool:
    from diffusiond.models.builtin import builtin_model_dir

    try:
        return model_dir.resolve() == builtin_model_dir().resolve()
    except OSError:
        return False


def warm_up(model: LoadedModel) -> None:
    """The backend's own warm-up (e.g. its networks at their optimal shapes), then one short generation
    at the default size (from a grey init image where the model takes one, so the VAE encoder is warm
    too), so the first client does not pay for lazy initialisation."""
    started = time.perf_counter()
    backends.warm_up(model.backend)
    params = GenerationParams(prompt="warm up", steps=1, seed=0, request_id="warmup")
    if model.image_support.img2img:
        size = (model.limits.default_width, model.limits.default_height)
        grey = io.BytesIO()
        Image.new("RGB", size, (128, 128, 128)).save(grey, format="PNG")
        params = replace(params, init_image=grey.getvalue(), strength=1.0)
    model.pipeline.generate(resolve(params, model))
    log.info("warmed up %s in %.2fs", model.name, time.perf_counter() - started)


class ModelRegistry:
    """The models a server has loaded; the first one added is the default."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self.default_name: str | None = None

    def add(self, model: LoadedModel) -> None:
        if model.name in self._models:
            raise FailedPrecondition(f"a model named {model.name!r} is already loaded")
        self._models[model.name] = model
        if self.default_name is None:
            self.default_name = model.name

    def get(self, name: str) -> LoadedModel:
        if not name:
            if self.default_name is None:
                raise NotFound("no model is loaded")
            return self._models[self.default_name]
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"model {shown(name)} is not loaded; loaded models: {', '.join(self._models)}") from None

    def __iter__(self):
        return iter(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.backend.close()
