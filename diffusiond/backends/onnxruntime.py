"""ONNX Runtime backend: runs an exported ONNX directory (ours, or one from ``optimum-cli export onnx``).

The directory has Optimum's layout (``text_encoder/``, ``unet/``,
``vae_decoder/``, ``vae_encoder/`` each with ``model.onnx``). Our exports carry
a ``manifest.json``, which is checked before anything loads: a missing
component, another source model or another precision than asked is refused
with the reason. A directory without a manifest is served with a warning.

Input names and dtypes are read from each session rather than assumed, so the
differences between exporters are absorbed here: the UNet's ``timestep`` may be
float or int64, a batch vector, a one-element vector or a scalar; token ids
int32 or int64; fp16 graphs take fp16 inputs; the VAE encoder may return the
distribution's parameters (``latent_parameters``, mean first) or the mean
itself. Tensors cross the backend boundary as float32 torch tensors on the CPU,
as on every backend.

Execution providers are picked from what this onnxruntime build offers
(TensorRT, then CUDA, then CPU) or from ``--providers``; TensorRT gets its
optimisation profiles from the model descriptors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusiond.backends.base import BackendSettings
from diffusiond.errors import FailedPrecondition, InvalidArgument, MissingDependency, ResourceExhausted
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    NetworkDescriptor,
    ShapeProfile,
    descriptors_for,
)

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
MODEL_FILE = "model.onnx"

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime", "the onnxruntime backend", "onnx") from None
    return onnxruntime


def choose_providers(requested: tuple[str, ...], available: list[str]) -> list[str]:
    """ORT provider names, in order: the requested ones (all must exist) or every known one available."""
    if not requested:
        chosen = [PROVIDERS[p] for p in AUTO_ORDER if PROVIDERS[p] in available]
        return chosen or ["CPUExecutionProvider"]
    chosen = []
    for name in requested:
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            raise InvalidArgument(
                "providers", f"{name!r} is not one of {', '.join(PROVIDERS)} (or their ONNX Runtime names)"
            )
        if full not in available:
            raise FailedPrecondition(
                f"execution provider {full} was asked for, but this onnxruntime build has only "
                f"{', '.join(available)} (a GPU build is the onnxruntime-gpu package)"
            )
        if full not in chosen:
            chosen.append(full)
    return chosen


def graph_optimization_level(ort, name: str):
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    try:
        return levels[name]
    except KeyError:
        raise InvalidArgument("graph_optimization", f"{name!r} is not one of {', '.join(GRAPH_OPTIMIZATION)}") from None


def is_onnx_export(directory: Path) -> bool:
    return (directory / UNET / MODEL_FILE).is_file()


def infer_precision(unet_path: Path, unet_input_types: list[str]) -> str:
    """Precision of a directory without manifest: fp16 inputs, or quantize/dequantize nodes, tell."""
    if "tensor(float16)" in unet_input_types:
        return "fp16"
    try:
        import onnx

        graph = onnx.load(str(unet_path), load_external_data=False).graph
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in graph.node):
            return "int8"
        if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
            return "fp16"
    except ImportError:
        pass
    return "fp32"


class _Network:
    """One ONNX Runtime session and how to feed it."""

    def __init__(self, ort, path: Path, options, providers: list[Any], descriptor: NetworkDescriptor) -> None:
        self.name = descriptor.name
        self.descriptor = descriptor
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # unsupported opset, corrupt file, missing external data...
            raise FailedPrecondition(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def require_inputs(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.inputs]
        extra = [n for n in self.inputs if n not in names]
        if missing or extra:
            raise FailedPrecondition(
                f"{self.name}: the ONNX graph's inputs are {', '.join(self.inputs)}; this backend feeds "
                f"{', '.join(names)} (missing: {', '.join(missing) or 'none'}, unsupported: {', '.join(extra) or 'none'})"
            )

    def input_type(self, name: str) -> str:
        return self.inputs[name].type

    def cast(self, name: str, value: np.ndarray) -> np.ndarray:
        dtype = _NUMPY_TYPES.get(self.inputs[name].type)
        if dtype is None:
            raise FailedPrecondition(f"{self.name}: input {name} has unsupported type {self.inputs[name].type}")
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
            value = np.rint(value)
        return np.ascontiguousarray(value.astype(dtype, copy=False))

    def output_index(self, *preferred: str) -> int:
        for name in preferred:
            if name in self.outputs:
                return self.outputs.index(name)
        return 0

    def run(self, feeds: dict[str, np.ndarray], output: int = 0) -> np.ndarray:
        try:
            result = self.session.run([self.outputs[output]], {k: self.cast(k, v) for k, v in feeds.items()})[0]
        except Exception as exc:
            text = str(exc)
            if "allocat" in text.lower() or "out of memory" in text.lower():
                raise ResourceExhausted(f"{self.name} ran out of memory: {text}") from None
            raise
        return result


class OnnxRuntimeBackend:
    """Runs Optimum-layout ONNX networks with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        ort = import_onnxruntime()
        from diffusiond.export.manifest import check_for_serving, read_manifest

        if not is_onnx_export(model_dir):
            hint = " (a diffusers-format model: export it first with `diffusiond export onnx`)" if (model_dir / "unet").is_dir() else ""
            raise FailedPrecondition(f"{model_dir} holds no {UNET}/{MODEL_FILE}: not an ONNX export{hint}")
        manifest = read_manifest(model_dir)
        if manifest is not None:
            check_for_serving(model_dir, manifest, settings.expect_precision or None,
                              settings.expect_source_sha256 or None)
        else:
            if settings.expect_source_sha256:
                raise FailedPrecondition(
                    f"{model_dir} has no manifest.json, so its source model cannot be checked against "
                    f"the expected hash {settings.expect_source_sha256[:16]}..."
                )
            log.warning(
                "%s has no manifest.json (not exported by diffusiond, e.g. optimum-cli): serving it unchecked; "
                "source, precision and tool versions are unknown", model_dir,
            )
        for component in (TEXT_ENCODER, UNET, VAE_DECODER):
            if not (model_dir / component / MODEL_FILE).is_file():
                raise FailedPrecondition(f"{model_dir} has no {component}/{MODEL_FILE}")
        if settings.dtype not in ("fp32", "") and not settings.expect_precision:
            log.warning("--dtype %s is ignored by the onnxruntime backend: the export fixes the precision "
                        "(use --precision to require one)", settings.dtype)

        self._descriptors = descriptors_for(model_dir)
        if manifest is not None:
            profile = ShapeProfile.from_json(manifest.profile)
        else:
            profile = ShapeProfile.around(load_model_config(model_dir).default_size)
        opts = settings.onnxruntime
        available = ort.get_available_providers()
        self._provider_names = choose_providers(tuple(opts.providers), available)
        self._device_id = _device_id(settings.device)
        self._level = graph_optimization_level(ort, opts.graph_optimization)

        precision_hint = manifest.precision if manifest is not None else ""
        self._networks: dict[str, _Network] = {}
        for component in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER):
            path = model_dir / component / MODEL_FILE
            if not path.is_file():
                continue
            descriptor = self._descriptors[component]
            providers = self._providers(component, descriptor, profile, precision_hint, model_dir, opts.trt_cache_dir)
            self._networks[component] = _Network(ort, path, self._session_options(ort, settings), providers, descriptor)

        self._networks[TEXT_ENCODER].require_inputs(["input_ids"])
        self._networks[UNET].require_inputs(["sample", "timestep", "encoder_hidden_states"])
        self._networks[VAE_DECODER].require_inputs(["latent_sample"])
        if VAE_ENCODER in self._networks:
            self._networks[VAE_ENCODER].require_inputs(["sample"])
        unet = self._networks[UNET]
        self._precision = manifest.precision if manifest is not None else infer_precision(
            model_dir / UNET / MODEL_FILE, [i.type for i in unet.inputs.values()]
        )
        if manifest is None and settings.expect_precision and settings.expect_precision != self._precision:
            raise FailedPrecondition(
                f"{model_dir} holds {self._precision} networks (judged from the graph; it has no manifest), "
                f"but precision {settings.expect_precision} was asked for"
            )
        self._text_out = self._networks[TEXT_ENCODER].output_index("last_hidden_state")
        self._timestep_shape = unet.inputs["timestep"].shape
        log.info(
            "onnxruntime %s: %s, %s networks, providers %s", ort.__version__, model_dir, self._precision,
            ", ".join(unet.providers),
        )

    # -- session construction -------------------------------------------------------

    def _session_options(self, ort, settings: BackendSettings):
        options = ort.SessionOptions()
        options.graph_optimization_level = self._level
        if settings.threads > 0:
            options.intra_op_num_threads = settings.threads
        if settings.onnxruntime.inter_op_threads > 0:
            options.inter_op_num_threads = settings.onnxruntime.inter_op_threads
        options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
        return options

    def _providers(
        self, component: str, descriptor: NetworkDescriptor, profile: ShapeProfile, precision: str,
        model_dir: Path, trt_cache_dir: str,
    ) -> list[Any]:
        providers: list[Any] = []
        for name in self._provider_names:
            if name == "TensorrtExecutionProvider":
                providers.append((name, self._tensorrt_options(component, descriptor, profile, precision, model_dir, trt_cache_dir)))
            elif name == "CUDAExecutionProvider":
                providers.append((name, {"device_id": self._device_id}))
            else:
                providers.append(name)
        return providers

    def _tensorrt_options(
        self, component: str, descriptor: NetworkDescriptor, profile: ShapeProfile, precision: str,
        model_dir: Path, trt_cache_dir: str,
    ) -> dict[str, Any]:
        """TensorRT EP options: the descriptor's (min, opt, max) shapes, engine cache, precision flags."""
        from diffusiond.models.builtin import cache_root

        shapes = descriptor.input_profile(profile)

        def fmt(i: int) -> str:
            return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())

        cache = Path(trt_cache_dir) if trt_cache_dir else cache_root() / "trt-ep" / model_dir.resolve().name
        cache = cache / component
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": self._device_id,
            "trt_fp16_enable": precision in ("fp16", "int8"),
            "trt_int8_enable": precision == "int8",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_profile_min_shapes": fmt(0),
            "trt_profile_opt_shapes": fmt(1),
            "trt_profile_max_shapes": fmt(2),
        }

    # -- Backend protocol -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype_name(self) -> str:
        return self._precision

    @property
    def providers(self) -> list[str]:
        return self._networks[UNET].providers

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self._networks[TEXT_ENCODER].run({"input_ids": input_ids.cpu().numpy()}, self._text_out)
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        feeds = {
            "sample": sample.cpu().numpy(),
            "timestep": self._timesteps(timestep, sample.shape[0]),
            "encoder_hidden_states": encoder_hidden_states.cpu().numpy(),
        }
        out = self._networks[UNET].run(feeds)
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def _timesteps(self, timestep: torch.Tensor, batch: int) -> np.ndarray:
        """The pipeline's [B] float timesteps in the shape this graph declares (all rows share one t)."""
        t = timestep.cpu().numpy().reshape(-1)
        shape = self._timestep_shape
        if len(shape) == 0:
            return np.asarray(t[0])
        if isinstance(shape[0], int) and shape[0] != batch:
            return np.full((shape[0],), t[0], dtype=t.dtype)
        return t if t.shape[0] == batch else np.full((batch,), t[0], dtype=t.dtype)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self._networks[VAE_DECODER].run({"latent_sample": latents.cpu().numpy()})
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        network = self._networks.get(VAE_ENCODER)
        if network is None:
            raise FailedPrecondition("this ONNX export has no vae_encoder, which image inputs need")
        out = network.run({"sample": images.cpu().numpy()}, network.output_index("latent_parameters", "latent_sample"))
        channels = self._descriptors[VAE_ENCODER].dims.latent_channels
        if out.shape[1] == 2 * channels:  # mean and log-variance: the mean is the first half
            out = out[:, :channels]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def close(self) -> None:
        self._networks.clear()


def _device_id(device: str) -> int:
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            raise InvalidArgument("device", f"{device!r} is not cuda:N") from None
    return 0
