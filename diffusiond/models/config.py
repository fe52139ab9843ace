"""What the pipeline must know about a model, read from its directory's JSON configs.

Works for both layouts the service serves: diffusers (``unet/``, ``vae/``,
``text_encoder/``) and Optimum's ONNX export (``unet/``, ``vae_decoder/``,
``text_encoder/``), since both keep each component's ``config.json``. Reading
JSON rather than instantiating networks keeps this independent of the backend.

A model directory may also hold ``diffusiond.json`` with the sampling defaults
its authors recommend (``{"default_steps": 20, "default_guidance_scale": 4.0}``);
the default scheduler is the one ``scheduler/scheduler_config.json`` names.
Other tools ignore the file; without it the defaults are SD's (30 steps, 7.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusiond.errors import FailedPrecondition, NotFound

SERVING_DEFAULTS_FILE = "diffusiond.json"

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline",
    "ORTStableDiffusionPipeline",
    "OnnxStableDiffusionPipeline",
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves steps or guidance unset gets."""

    steps: int = 30
    guidance_scale: float = 7.5


@dataclass(frozen=True)
class ModelConfig:
    """Backend-independent facts about a Stable-Diffusion-class model."""

    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    unet_sample_size: int
    text_hidden_size: int
    text_max_length: int
    prediction_type: str
    scheduler_config: dict[str, Any]
    pipeline_class: str
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    unet_in_channels: int = 0  # 0: latent_channels; 2 * latent_channels + 1 for an inpainting UNet
    has_vae_encoder: bool = True  # an export may leave it out; image inputs need it

    @property
    def default_size(self) -> int:
        return self.unet_sample_size * self.vae_scale_factor

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel (for SD) UNet that takes the mask and the masked image's latents as extra inputs."""
        return self.unet_in_channels == 2 * self.latent_channels + 1


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"model file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"model file {path} is not valid JSON: {exc}") from None


def _vae_config(directory: Path) -> dict[str, Any]:
    for sub in ("vae", "vae_decoder"):
        path = directory / sub / "config.json"
        if path.is_file():
            return read_json(path)
    raise NotFound(f"{directory} has no vae/config.json or vae_decoder/config.json")


def read_sampling_defaults(directory: Path) -> SamplingDefaults:
    """The model's own ``diffusiond.json`` defaults, else SD's."""
    path = directory / SERVING_DEFAULTS_FILE
    if not path.is_file():
        return SamplingDefaults()
    values = read_json(path)
    known = {"default_steps", "default_guidance_scale"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FailedPrecondition(f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    base = SamplingDefaults()
    steps = values.get("default_steps", base.steps)
    guidance = values.get("default_guidance_scale", base.guidance_scale)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FailedPrecondition(f"{path}: default_steps must be a positive integer, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise FailedPrecondition(f"{path}: default_guidance_scale must be a number >= 0, got {guidance!r}")
    return SamplingDefaults(steps=steps, guidance_scale=float(guidance))


def load_model_config(directory: Path) -> ModelConfig:
    """Read a model directory's configs; raise NotFound/FailedPrecondition naming what is wrong."""
    if not directory.is_dir():
        raise NotFound(f"model directory {directory} does not exist")
    index = read_json(directory / "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise FailedPrecondition(
            f"{directory}: pipeline class {pipeline_class!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_PIPELINES))})"
        )
    unet = read_json(directory / "unet" / "config.json")
    vae = _vae_config(directory)
    text = read_json(directory / "text_encoder" / "config.json")
    scheduler = read_json(directory / "scheduler" / "scheduler_config.json")
    tokenizer_cfg_path = directory / "tokenizer" / "tokenizer_config.json"
    tokenizer_cfg = read_json(tokenizer_cfg_path) if tokenizer_cfg_path.is_file() else {}
    max_positions = int(text.get("max_position_embeddings", 77))
    max_length = int(tokenizer_cfg.get("model_max_length", max_positions))
    if max_length > max_positions:  # some configs store a huge sentinel
        max_length = max_positions
    latent_channels = int(vae.get("latent_channels", 4))
    unet_in_channels = int(unet.get("in_channels", latent_channels))
    if unet_in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise FailedPrecondition(
            f"{directory}: the UNet takes {unet_in_channels} input channels; diffusiond serves UNets of "
            f"{latent_channels} (the latents) or {2 * latent_channels + 1} (inpainting: latents, mask, masked image)"
        )
    return ModelConfig(
        latent_channels=latent_channels,
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        unet_sample_size=int(unet.get("sample_size", 64)),
        text_hidden_size=int(text.get("hidden_size", 768)),
        text_max_length=max_length,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        scheduler_config=scheduler,
        pipeline_class=pipeline_class,
        sampling_defaults=read_sampling_defaults(directory),
        unet_in_channels=unet_in_channels,
        # diffusers layout: vae/ holds both halves; exports hold vae_encoder/ only when it was exported.
        has_vae_encoder=(directory / "vae").is_dir() or (directory / "vae_encoder").is_dir(),
    )
