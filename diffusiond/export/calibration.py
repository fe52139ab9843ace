"""Calibration data for INT8: the UNet's real inputs while it denoises calibration prompts.

Static quantization needs the ranges of the activations the UNet actually
sees. They depend on the timestep and on the text context, so random tensors
calibrate badly; instead the source model generates images for a set of
prompts (the PyTorch fp32 pipeline, the same loop the server runs) and every
UNet call is recorded: every timestep, both halves of the guidance batch
(unconditional and conditional rows together, as the UNet runs them).
Defaults follow NVIDIA's diffusion INT8 recipe: about 32 prompts, 20-30
steps, guidance batch 2, fixed seeds so scales are reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusiond.backends.base import CrossAttentionKV
from diffusiond.errors import InvalidArgument, NotFound

DEFAULT_PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
# A model directory may bring its own calibration prompts (the built-in model does: it only knows shapes).
MODEL_PROMPTS_FILE = "calibration_prompts.txt"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class CalibrationSettings:
    prompts_file: Path | None = None  # None: the model's calibration_prompts.txt, else the set shipped here
    max_prompts: int = 32  # 0: every prompt in the file
    steps: int = 20
    guidance_scale: float | None = None  # None: the model's default (7.5 for SD)
    size: int = 0  # pixels, square; 0: the model's native size
    scheduler: str = ""  # empty: the model's own
    seed: int = 0
    method: str = "percentile"
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise InvalidArgument("calibration method", f"{self.method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if self.steps < 1:
            raise InvalidArgument("calibration steps", f"must be at least 1, got {self.steps}")
        if self.max_prompts < 0:
            raise InvalidArgument("calibration prompts", f"must be 0 (all) or more, got {self.max_prompts}")

    @property
    def path(self) -> Path:
        return self.prompts_file or DEFAULT_PROMPTS_FILE

    def prompts(self) -> list[str]:
        return read_prompts(self.path, self.max_prompts)

    def to_json(self) -> dict[str, object]:
        """What decides the scales (the prompts by content, not by path)."""
        prompts = self.prompts()
        return {
            "prompts_file": str(self.path) if self.prompts_file else "default",
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
            "prompts": len(prompts),
            "steps": self.steps,
            "guidance_scale": self.guidance_scale if self.guidance_scale is not None else "model default",
            "size": self.size,
            "scheduler": self.scheduler or "model default",
            "seed": self.seed,
            "method": self.method,
            "percentile": self.percentile if self.method == "percentile" else None,
        }


def for_model(settings: CalibrationSettings, model_dir: Path) -> CalibrationSettings:
    """Settings whose default prompts are the model's own ``calibration_prompts.txt`` where it has one."""
    own = model_dir / MODEL_PROMPTS_FILE
    if settings.prompts_file is None and own.is_file():
        return dataclasses.replace(settings, prompts_file=own)
    return settings


def read_prompts(path: Path, limit: int = 0) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NotFound(f"calibration prompts file {path} does not exist") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidArgument("calibration prompts", f"{path} holds no prompts (one per line)")
    return prompts[:limit] if limit else prompts


class _RecordUNet:
    """Wraps a backend: keeps a copy of every UNet call's inputs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.samples: list[dict[str, np.ndarray]] = []

    def unet(self, sample, timestep, encoder_hidden_states):
        # The exported UNet takes the encoding itself, not the keys and values PyTorch precomputes from it.
        context = encoder_hidden_states.hidden_states if isinstance(encoder_hidden_states, CrossAttentionKV) \
            else encoder_hidden_states
        self.samples.append(
            {
                "sample": sample.detach().float().cpu().numpy().copy(),
                "timestep": timestep.detach().float().cpu().numpy().copy(),
                "encoder_hidden_states": context.detach().float().cpu().numpy().copy(),
            }
        )
        return self.inner.unet(sample, timestep, encoder_hidden_states)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def capture_unet_inputs(model_dir: Path, settings: CalibrationSettings, progress=None) -> list[dict[str, np.ndarray]]:
    """Run the fp32 PyTorch pipeline over the calibration prompts; return every UNet call's inputs."""
    from diffusiond.service.models import load_model
    from diffusiond.service.resolver import GenerationParams, resolve

    model = load_model("calibration", model_dir, "torch", prompt_cache_size=0)
    try:
        recorder = _RecordUNet(model.pipeline.backend)
        model.pipeline.backend = recorder
        size = settings.size or model.config.default_size
        prompts = settings.prompts()
        for i, prompt in enumerate(prompts):
            params = GenerationParams(
                request_id=f"calibration-{i}", prompt=prompt, width=size, height=size, steps=settings.steps,
                guidance_scale=settings.guidance_scale, seed=settings.seed + i, scheduler=settings.scheduler,
            )
            model.pipeline.denoise(resolve(params, model))  # the UNet inputs are all it needs: no decode
            if progress is not None:
                progress.count("calibration prompts", i + 1, len(prompts), every=max(1, len(prompts) // 8))
        return recorder.samples
    finally:
        model.backend.close()


class UNetCalibrationReader:
    """ONNX Runtime's CalibrationDataReader over recorded UNet inputs, cast to the graph's input dtypes."""

    def __init__(self, samples: Sequence[dict[str, np.ndarray]], input_dtypes: dict[str, np.dtype] | None = None) -> None:
        self._samples = samples
        self._dtypes = input_dtypes or {}
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._iter, None)
        if item is None:
            return None
        return {k: v.astype(self._dtypes.get(k, v.dtype), copy=False) for k, v in item.items()}

    def rewind(self) -> None:
        self._iter = iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)
