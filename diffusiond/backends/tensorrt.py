"""TensorRT backend: runs engines built by ``diffusiond export tensorrt`` on a CUDA GPU.

All four networks run as TensorRT engines. Before anything loads, the
artifact's manifest is checked against the machine: an engine built for
another compute capability or another TensorRT version is refused
(FAILED_PRECONDITION) with both sides named. At run time every input shape is
checked against the engine's optimisation profile, so a request the engine was
not built for fails with FAILED_PRECONDITION naming the input and the range,
instead of a TensorRT error. A call with more rows than the profile's largest
batch (several requests batched together) runs in pieces the profile covers.

Tensors cross the backend boundary as float32 torch tensors on the GPU; each
engine's own I/O dtypes are read from the engine and converted here. Buffers
are torch CUDA tensors (their ``data_ptr``), and engines are enqueued on
torch's current stream, so the caching allocator's stream order keeps inputs
alive until the engine has read them, with no synchronisation per call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends.base import BackendSettings
from diffusiond.backends.torch_eager import resolve_device
from diffusiond.errors import FailedPrecondition
from diffusiond.export.tensorrt_build import (
    EngineManifest,
    MachineInfo,
    compatibility_problems,
    import_tensorrt,
    missing_engines,
)
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER

log = logging.getLogger(__name__)

# What this backend feeds each network.
FEEDS = {
    TEXT_ENCODER: ("input_ids",),
    UNET: ("sample", "timestep", "encoder_hidden_states"),
    VAE_DECODER: ("latent_sample",),
    VAE_ENCODER: ("sample",),
}


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


def timesteps_for(timestep: torch.Tensor, rows: int, low: tuple[int, ...], high: tuple[int, ...]) -> torch.Tensor:
    """The pipeline's [rows] timesteps (all equal) in the shape the engine's ``timestep`` input takes."""
    if len(low) == 0:  # a scalar input
        return timestep.reshape(-1)[0]
    if low == high and low[0] != rows:  # a fixed length, e.g. [1]
        return timestep.reshape(-1)[:1].expand(low[0])
    return timestep


class EngineRunner:
    """One deserialized engine with its execution context; runs named torch tensors."""

    def __init__(self, trt: Any, runtime: Any, path: Path, network: str, device: torch.device) -> None:
        self.network = network
        self.device = device
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise FailedPrecondition(f"TensorRT could not load {path} (see its log above)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.inputs: dict[str, torch.dtype] = {}
        self.outputs: dict[str, torch.dtype] = {}
        self.bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.batched: set[str] = set()  # inputs whose first dimension is dynamic (rows)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                self.outputs[name] = dtype
                continue
            self.inputs[name] = dtype
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                low, _, high = engine.get_tensor_profile_shape(name, 0)
                self.bounds[name] = (tuple(low), tuple(high))
                if shape[0] < 0:
                    self.batched.add(name)
            else:  # a static input has no profile: its one shape is the range
                self.bounds[name] = (shape, shape)
        expected = FEEDS.get(network)
        if expected is None:
            raise FailedPrecondition(f"{path}: {network} is not a network diffusiond runs ({', '.join(FEEDS)})")
        if sorted(self.inputs) != sorted(expected):
            raise FailedPrecondition(
                f"{path}: the engine's inputs are {', '.join(self.inputs)}; the {network} takes "
                f"{', '.join(expected)}: rebuild it from a diffusiond or Optimum ONNX export"
            )

    @property
    def max_rows(self) -> int:
        """The most rows one call of the engine takes (0: no dynamic batch)."""
        return min((self.bounds[n][1][0] for n in self.batched), default=0)

    def output_name(self, *preferred: str) -> str:
        for name in preferred:
            if name in self.outputs:
                return name
        return next(iter(self.outputs))

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on ``feeds``; more rows than the profile allows run in pieces, concatenated."""
        pieces = [self._run(piece) for piece in split_rows(feeds, self.batched, self.max_rows)]
        if len(pieces) == 1:
            return pieces[0]
        return {name: torch.cat([p[name] for p in pieces]) for name in self.outputs}

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            inputs = {}
            for name, dtype in self.inputs.items():
                tensor = feeds[name].to(self.device)
                if not dtype.is_floating_point and tensor.is_floating_point():
                    tensor = tensor.round()  # float timesteps into an integer input: round, don't truncate
                tensor = tensor.to(dtype).contiguous()
                check_in_profile(self.network, name, tuple(tensor.shape), *self.bounds[name])
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
                inputs[name] = tensor  # alive until enqueued; the allocator orders reuse after it
            outputs = {}
            for name, dtype in self.outputs.items():
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the {self.network} engine (see its log above)")
        return outputs


class TensorRTBackend:
    """Runs the four networks of a ``diffusiond export tensorrt`` artifact."""

    name = "tensorrt"

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        trt = import_tensorrt()
        manifest = EngineManifest.read(model_dir)
        device = resolve_device(settings.device if settings.device.startswith("cuda") else "cuda")
        if settings.device != str(device):
            log.info("the tensorrt backend runs on %s (--device %s asked for)", device, settings.device)
        machine = MachineInfo.current(str(device))
        problems, notes = compatibility_problems(manifest, machine)
        problems += missing_engines(model_dir, manifest)
        if settings.expect_precision and settings.expect_precision != manifest.precision:
            problems.append(f"holds {manifest.precision} engines, but precision {settings.expect_precision} was asked for")
        expected_source = settings.expect_source_sha256.lower()
        if expected_source and not manifest.model_sha256.startswith(expected_source):
            problems.append(
                f"was built from another model: its source hash is {manifest.model_sha256[:16] or 'unknown'}..., "
                f"expected {expected_source[:16]}..."
            )
        if problems:
            raise FailedPrecondition(f"TensorRT artifact {model_dir} cannot be served here: {'; '.join(problems)}")
        for note in notes:
            log.warning("%s: %s", model_dir, note)
        if settings.dtype not in ("fp32", "") and not settings.expect_precision:
            log.warning("--dtype %s is ignored by the tensorrt backend: the engines fix the precision "
                        "(use --precision to require one)", settings.dtype)
        self._latent_channels = load_model_config(model_dir).latent_channels
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._device = device
        self._precision = manifest.precision
        with torch.cuda.device(device):
            self._nets = {
                name: EngineRunner(trt, self._runtime, model_dir / entry["file"], name, device)
                for name, entry in manifest.components.items()
            }
        log.info("tensorrt %s: %s, %s engines on %s (%s)", trt.__version__, model_dir, self._precision,
                 machine.gpu_name, device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype_name(self) -> str:
        return self._precision

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        net = self._nets[TEXT_ENCODER]
        return net.run({"input_ids": input_ids})[net.output_name("last_hidden_state")].float()

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        net = self._nets[UNET]
        timestep = timesteps_for(timestep, sample.shape[0], *net.bounds["timestep"])
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        return net.run(feeds)[net.output_name("out_sample")].float()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        net = self._nets[VAE_DECODER]
        return net.run({"latent_sample": latents})[net.output_name("sample")].float()

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        net = self._nets.get(VAE_ENCODER)
        if net is None:
            raise FailedPrecondition("this TensorRT artifact has no vae_encoder engine, which image inputs need")
        out = net.run({"sample": images})[net.output_name("latent_parameters", "latent_sample")].float()
        if out.shape[1] == 2 * self._latent_channels:  # mean and log-variance: the mean is the first half
            out = out[:, : self._latent_channels]
        return out.contiguous()

    def close(self) -> None:
        self._nets.clear()
        torch.cuda.empty_cache()
