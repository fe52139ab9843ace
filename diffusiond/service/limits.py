"""Per-model request limits and defaults: what ListModels advertises and validation enforces."""

from __future__ import annotations

from dataclasses import dataclass

from diffusiond.errors import FailedPrecondition
from diffusiond.models.config import ModelConfig
from diffusiond.service.image_decode import ImageLimits


@dataclass(frozen=True)
class ModelLimits:
    default_width: int
    default_height: int
    size_multiple: int
    min_size: int
    max_size: int
    default_steps: int = 30
    max_steps: int = 200
    max_images: int = 8
    default_guidance_scale: float = 7.5
    max_guidance_scale: float = 30.0
    max_prompt_chars: int = 4096
    max_preview_size: int = 4096
    input_images: ImageLimits = ImageLimits()  # init and mask images, each (the server's --max-input-* flags)
    default_cache_interval: int = 1  # step caching off unless a request or the server asks
    default_cache_depth: int = 1

    @classmethod
    def for_model(cls, config: ModelConfig, max_size: int = 2048, size_multiple: int | None = None,
                  **overrides: object) -> ModelLimits:
        """Defaults from the model's configs: native size from the UNet sample size times the VAE factor,
        steps and guidance from its ``diffusiond.json`` (SD's where it has none)."""
        multiple = size_multiple or config.vae_scale_factor
        native = config.default_size
        values: dict[str, object] = {
            "default_steps": config.sampling_defaults.steps,
            "default_guidance_scale": config.sampling_defaults.guidance_scale,
            **overrides,
        }
        limits = cls(
            default_width=native,
            default_height=native,
            size_multiple=multiple,
            min_size=multiple * 8,
            max_size=max(max_size, native),
            **values,  # type: ignore[arg-type]
        )
        if not 1 <= limits.default_steps <= limits.max_steps:
            raise FailedPrecondition(f"default steps {limits.default_steps} is outside 1..{limits.max_steps}")
        if limits.default_guidance_scale > limits.max_guidance_scale:
            raise FailedPrecondition(
                f"default guidance scale {limits.default_guidance_scale} is above {limits.max_guidance_scale}"
            )
        return limits
