"""Backend names -> implementations, imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from diffusiond.backends.base import Backend, BackendSettings
from diffusiond.errors import NotFound

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def create_backend(name: str, model_dir: Path, settings: BackendSettings) -> Backend:
    if name == "torch":
        from diffusiond.backends.torch_eager import TorchEagerBackend

        return TorchEagerBackend(model_dir, settings)
    if name == "onnxruntime":
        from diffusiond.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_dir, settings)
    if name == "tensorrt":
        from diffusiond.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model_dir, settings)
    raise NotFound(f"backend {name!r} is not available; choose one of: {', '.join(BACKENDS)}")
