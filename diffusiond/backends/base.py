"""The one protocol every inference backend implements.

A backend runs networks and nothing else: the text-to-image loop, schedulers,
guidance and previews live in ``diffusiond.pipeline`` and never change when a
backend is added. All tensors crossing this boundary are ``torch`` tensors on
``backend.device`` in float32 (token ids in int64), whatever precision the
backend computes in internally, so the pipeline's scheduler arithmetic is the
same on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """ONNX Runtime session choices (plain data: importing this needs no onnxruntime)."""

    # Execution providers in order of preference: "tensorrt", "cuda", "cpu" (or ORT's full names).
    # Empty: every one of those this onnxruntime build has, TensorRT first.
    providers: tuple[str, ...] = ()
    graph_optimization: str = "all"  # "disable", "basic", "extended", "all"
    inter_op_threads: int = 0  # 0: ONNX Runtime's default
    # TensorRT engines are cached here (default: a folder under the diffusiond cache).
    trt_cache_dir: str = ""


@dataclass(frozen=True)
class BackendSettings:
    """What an operator chooses when starting a backend."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    dtype: str = "fp32"  # "fp32", "fp16", "bf16"
    threads: int = 0  # intra-op CPU threads; 0: the runtime's default (one per core)
    # What an exported artifact must be; a manifest that says otherwise is refused.
    expect_precision: str = ""  # "fp32", "fp16", "int8"; empty: whatever it holds
    expect_source_sha256: str = ""  # a prefix of the source model's hash; empty: any source
    onnxruntime: OnnxRuntimeOptions = field(default_factory=OnnxRuntimeOptions)


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch", "onnxruntime", "tensorrt"

    @property
    def device(self) -> torch.device:
        """Where the pipeline keeps latents for this backend."""
        ...

    @property
    def dtype_name(self) -> str:
        """The precision the networks compute in, for ListModels and logs."""
        ...

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 token ids -> [B, T, D] hidden states (the text encoder's last layer)."""
        ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] scaled model input, [B] timesteps, [B, T, D] context -> [B, C, h, w] model output."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] unscaled latents -> [B, 3, H, W] images in about [-1, 1]."""
        ...

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [-1, 1] -> [B, C, h, w] unscaled latents (the distribution's mean)."""
        ...

    def close(self) -> None:
        """Free device memory and sessions."""
        ...


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
