"""TensorRT backend: runs engines built by ``diffusiond export tensorrt`` on a CUDA GPU.

All four networks run as TensorRT engines. Before anything loads, the
artifact's manifest is checked against the machine: an engine built for
another compute capability or another TensorRT version is refused
(FAILED_PRECONDITION) with both sides named. At run time every input shape is
checked against the engine's optimisation profile, so a request the engine was
not built for fails with FAILED_PRECONDITION naming the input and the range,
instead of a TensorRT error. A call with more rows than the profile's largest
batch (several requests batched together) runs in pieces the profile covers.

What every exported-graph backend shares (dtype casting at the float32
boundary, timestep shaping, the VAE mean, artifact checks) is in
``graph.GraphBackend``; this file deserializes engines and runs named tensors.
Buffers are torch CUDA tensors (their ``data_ptr``), and engines are enqueued
on torch's current stream, so the caching allocator's stream order keeps
inputs alive until the engine has read them, with no synchronisation per
call. A failed allocation (torch's, or one TensorRT logs while running) comes
out as ``OutOfMemory``.
"""

from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends import graph
from diffusiond.backends.base import BackendPlugin, BackendSettings, resolve_device
from diffusiond.backends.graph import Artifact, GraphBackend, GraphInput, check_artifact
from diffusiond.errors import FailedPrecondition
from diffusiond.models.descriptors import COMPONENTS, CONTROL_COMPONENTS, descriptors_for
from diffusiond.models.manifest import fused_adapter_set
from diffusiond.models.tensorrt_artifact import (
    EngineManifest,
    MachineInfo,
    compatibility_problems,
    import_tensorrt,
    missing_engines,
)

log = logging.getLogger(__name__)

# How TensorRT words a failed allocation in its log: "Error Code 1: Cuda Runtime (out of memory)",
# "Error Code 2: OutOfMemory (...)", "Requested amount of GPU memory (N bytes) could not be allocated".
_OOM_MARKERS = ("out of memory", "outofmemory", "could not be allocated", "failed to allocate")


def is_trt_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_MARKERS)


def check_in_profile(network: str, name: str, shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...]) -> None:
    """FailedPrecondition when ``shape`` lies outside the engine profile's [low, high] box."""
    if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
        raise FailedPrecondition(
            f"{network}: input {name} of shape {list(shape)} is outside the TensorRT engine's profile "
            f"(from {list(low)} to {list(high)}); rebuild the engines with a profile that covers it "
            "(`diffusiond export tensorrt --min-size/--max-size/--max-images`)"
        )


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64, "BF16": torch.bfloat16}
    table = {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}
    if dtype not in table:
        raise FailedPrecondition(f"engine tensor type {dtype} is not one diffusiond feeds")
    return table[dtype]


def split_rows(feeds: dict[str, torch.Tensor], batched: set[str], limit: int) -> list[dict[str, torch.Tensor]]:
    """``feeds`` cut into calls of at most ``limit`` rows of the ``batched`` inputs (the others go whole to each)."""
    rows = {feeds[n].shape[0] for n in batched if n in feeds and feeds[n].dim() > 0}
    if limit <= 0 or len(rows) != 1 or (total := rows.pop()) <= limit:
        return [feeds]
    return [
        {name: t[start : start + limit] if name in batched else t for name, t in feeds.items()}
        for start in range(0, total, limit)
    ]


def profile_shape(low: tuple[int, ...], high: tuple[int, ...]) -> tuple[int | None, ...]:
    """An input's shape as its profile bounds it: a dimension the profile pins (min == max) is fixed
    (e.g. a [1] timestep), the others dynamic (None)."""
    return tuple(lo if lo == hi else None for lo, hi in zip(low, high))


def capturing_logger(trt: Any):
    """A TensorRT logger that forwards to ``logging`` and keeps the latest errors, which say why a run failed."""
    levels = {
        trt.ILogger.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.ERROR: logging.ERROR,
        trt.ILogger.WARNING: logging.WARNING,
        trt.ILogger.INFO: logging.DEBUG,  # TensorRT's INFO is build and load detail
        trt.ILogger.VERBOSE: logging.DEBUG,
    }

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)
            self.count = 0
            self._lock = threading.Lock()

        def log(self, severity, msg) -> None:
            level = levels.get(severity, logging.WARNING)
            if level >= logging.ERROR:
                with self._lock:
                    self.count += 1
                    self.errors.append((self.count, msg))
            log.log(level, "TensorRT: %s", msg)

        def since(self, mark: int) -> list[str]:
            with self._lock:
                return [msg for n, msg in self.errors if n > mark]

    return CapturingLogger()


class EngineGraph:
    """One deserialized engine with its execution context; runs named torch tensors on its GPU."""

    def __init__(self, trt: Any, runtime: Any, logger: Any, path: Path, network: str, device: torch.device) -> None:
        self.network = network
        self.device = device
        self._logger = logger
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise FailedPrecondition(f"TensorRT could not load {path}: {'; '.join(logger.since(0)) or 'see its log'}")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise FailedPrecondition(f"TensorRT could not create an execution context for {path} "
                                     f"(its activation memory may not fit on {device})")
        self.inputs: dict[str, GraphInput] = {}
        self.outputs: dict[str, torch.dtype] = {}
        self.bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.batched: set[str] = set()  # inputs whose first dimension is dynamic (rows)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                self.outputs[name] = dtype
                continue
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                low, _, high = engine.get_tensor_profile_shape(name, 0)
                low, high = tuple(low), tuple(high)
                if shape[0] < 0:
                    self.batched.add(name)
            else:  # a static input has no profile: its one shape is the range
                low = high = shape
            self.bounds[name] = (low, high)
            self.inputs[name] = GraphInput(name, dtype, profile_shape(low, high))

    @property
    def max_rows(self) -> int:
        """The most rows one call of the engine takes (0: no dynamic batch)."""
        return min((self.bounds[n][1][0] for n in self.batched), default=0)

    def run(self, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """The named output for ``feeds``; more rows than the profile allows run in pieces, concatenated."""
        pieces = [self._run(piece)[output] for piece in split_rows(feeds, self.batched, self.max_rows)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def run_all(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every output for ``feeds`` (the ControlNet's residuals), pieces concatenated as in ``run``."""
        pieces = [self._run(piece) for piece in split_rows(feeds, self.batched, self.max_rows)]
        return {name: pieces[0][name] if len(pieces) == 1 else torch.cat([p[name] for p in pieces])
                for name in self.outputs}

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for name, tensor in feeds.items():  # already in the engine's dtype, on its device
                check_in_profile(self.network, name, tuple(tensor.shape), *self.bounds[name])
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name, dtype in self.outputs.items():
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            mark = self._logger.count
            if not self.context.execute_async_v3(stream.cuda_stream):
                errors = "; ".join(self._logger.since(mark)) or "see its log above"
                raise RuntimeError(f"TensorRT failed to run the {self.network} engine: {errors}")
        return outputs


class TensorRTBackend(GraphBackend):
    """Runs the four networks of a ``diffusiond export tensorrt`` artifact."""

    name = "tensorrt"
    is_runtime_out_of_memory = staticmethod(is_trt_out_of_memory)

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        trt = import_tensorrt()
        manifest = EngineManifest.read(model_dir)
        device = resolve_device(settings.device if settings.device.startswith("cuda") else "cuda")
        if settings.device != str(device):
            log.info("the tensorrt backend runs on %s (--device %s asked for)", device, settings.device)
        machine = MachineInfo.current(str(device))
        problems, notes = compatibility_problems(manifest, machine)
        problems += missing_engines(model_dir, manifest)
        problems += [f"lists an unknown network {c} in its manifest" for c in manifest.components
                     if c not in (*COMPONENTS, *CONTROL_COMPONENTS)]
        artifact = Artifact(model_dir, "TensorRT artifact", manifest.precision, manifest.model_sha256,
                            manifest.shape_profile, tuple(problems),
                            adapters=fused_adapter_set(manifest.source.get("adapters", [])))
        check_artifact(artifact, settings, self.name)
        for note in notes:
            log.warning("%s: %s", model_dir, note)
        self._logger = capturing_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            graphs = {
                name: EngineGraph(trt, self._runtime, self._logger, model_dir / entry["file"], name, device)
                for name, entry in manifest.components.items()
            }
        super().__init__(graphs, descriptors_for(model_dir), artifact, device)
        log.info("tensorrt %s: %s, %s engines on %s (%s)", trt.__version__, model_dir, artifact.precision,
                 machine.gpu_name, device)

    def close(self) -> None:
        super().close()
        torch.cuda.empty_cache()


PLUGIN = BackendPlugin(
    name="tensorrt",
    description="engines built by `diffusiond export tensorrt`, on a CUDA GPU",
    load=TensorRTBackend,
    warm_up=graph.warm_up,
)
