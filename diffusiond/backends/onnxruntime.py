"""ONNX Runtime backend: runs an exported ONNX directory (ours, or one from ``optimum-cli export onnx``).

The directory has Optimum's layout (``text_encoder/``, ``unet/``,
``vae_decoder/``, ``vae_encoder/`` each with ``model.onnx``). Our exports carry
a ``manifest.json``, which is checked before anything loads: a missing
component, another source model or another precision than asked is refused
with the reason. A directory without a manifest is served with a warning.

Input dtypes and shapes are read from each session rather than assumed, so
exporters' differences (int64 or float timesteps, one per row or one per call;
int32 token ids; fp16 I/O; the VAE encoder's mean or its parameters) are
absorbed by ``graph.GraphBackend``, which this file feeds: what is specific to
ONNX Runtime is sessions, execution providers and how it reports running out
of memory. Tensors cross the backend boundary as float32 torch tensors on the
CPU.

Execution providers are picked from what this onnxruntime build offers
(TensorRT, then CUDA, then CPU) or from ``--providers``; TensorRT gets its
optimisation profiles from the model descriptors.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusiond.backends import graph
from diffusiond.backends.base import BackendPlugin, BackendSettings
from diffusiond.backends.graph import Artifact, GraphBackend, GraphInput, check_artifact
from diffusiond.errors import FailedPrecondition, InvalidArgument, MissingDependency
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    COMPONENTS,
    CONTROL_COMPONENTS,
    REQUIRED_COMPONENTS,
    UNET,
    NetworkDescriptor,
    ShapeProfile,
    descriptors_for,
)
from diffusiond.models.manifest import fused_adapter_set, infer_precision, manifest_problems, read_manifest

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
MODEL_FILE = "model.onnx"

_TORCH_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}
# How ONNX Runtime words a failed allocation: its CPU arena ("Available memory of 3145728 is smaller
# than requested bytes of 16777216", from BFCArena::AllocateRawInternal), "Failed to allocate memory
# for requested buffer", and the CUDA provider's "CUDA failure 2: out of memory" /
# "cudaErrorMemoryAllocation". It raises these as its own Fail/RuntimeException, not MemoryError.
_OOM_MARKERS = ("out of memory", "failed to allocate", "smaller than requested bytes", "memoryallocation")


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


def is_ort_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


class OrtGraph:
    """One ONNX Runtime session, run with torch tensors on the CPU."""

    def __init__(self, ort, path: Path, options, providers: list[Any]) -> None:
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # unsupported opset, corrupt file, missing external data...
            raise FailedPrecondition(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.inputs: dict[str, GraphInput] = {}
        for i in self.session.get_inputs():
            if i.type not in _TORCH_TYPES:
                raise FailedPrecondition(f"{path}: input {i.name} has type {i.type}, which diffusiond does not feed")
            shape = tuple(d if isinstance(d, int) else None for d in i.shape)
            self.inputs[i.name] = GraphInput(i.name, _TORCH_TYPES[i.type], shape)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input_types = [i.type for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()

    def run(self, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        arrays = {name: tensor.cpu().numpy() for name, tensor in feeds.items()}
        return torch.from_numpy(self.session.run([output], arrays)[0])

    def run_all(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {name: tensor.cpu().numpy() for name, tensor in feeds.items()}
        return {name: torch.from_numpy(out) for name, out in zip(self.outputs, self.session.run(None, arrays))}


class OnnxRuntimeBackend(GraphBackend):
    """Runs Optimum-layout ONNX networks with ONNX Runtime."""

    name = "onnxruntime"
    is_runtime_out_of_memory = staticmethod(is_ort_out_of_memory)

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        ort = import_onnxruntime()
        opts = settings.options if settings.options is not None else OnnxRuntimeOptions()
        if not is_onnx_export(model_dir):
            hint = " (a diffusers-format model: export it first with `diffusiond export onnx`)" if (model_dir / "unet").is_dir() else ""
            raise FailedPrecondition(f"{model_dir} holds no {UNET}/{MODEL_FILE}: not an ONNX export{hint}")
        manifest = read_manifest(model_dir)
        if manifest is not None:
            profile = ShapeProfile.from_json(manifest.profile)
            check_artifact(
                Artifact(model_dir, "ONNX export", manifest.precision, manifest.source_sha256, profile,
                         tuple(manifest_problems(model_dir, manifest))),
                settings, self.name,
            )
        else:
            profile = ShapeProfile.around(load_model_config(model_dir).default_size)
            absent = [c for c in REQUIRED_COMPONENTS if not (model_dir / c / MODEL_FILE).is_file()]
            if absent:
                raise FailedPrecondition(f"{model_dir} has no {', '.join(f'{c}/{MODEL_FILE}' for c in absent)}")
            log.warning(
                "%s has no manifest.json (not exported by diffusiond, e.g. optimum-cli): serving it unchecked; "
                "source, precision and tool versions are unknown", model_dir,
            )

        descriptors = descriptors_for(model_dir)
        self._provider_names = choose_providers(tuple(opts.providers), ort.get_available_providers())
        self._device_id = _device_id(settings.device)
        level = graph_optimization_level(ort, opts.graph_optimization)
        precision_hint = manifest.precision if manifest is not None else ""
        graphs: dict[str, OrtGraph] = {}
        for component in (*COMPONENTS, *CONTROL_COMPONENTS):
            path = model_dir / component / MODEL_FILE
            if path.is_file() and component in descriptors:
                providers = self._providers(component, descriptors[component], profile, precision_hint, model_dir,
                                            opts.trt_cache_dir)
                graphs[component] = OrtGraph(ort, path, _session_options(ort, level, settings, opts), providers)

        if manifest is not None:
            artifact = Artifact(model_dir, "ONNX export", manifest.precision, manifest.source_sha256, profile,
                                adapters=fused_adapter_set(manifest.adapters))
        else:  # the precision is judged from the graph
            precision = infer_precision(model_dir / UNET / MODEL_FILE, graphs[UNET].input_types)
            artifact = Artifact(model_dir, "ONNX export", precision, None, profile)
            check_artifact(artifact, settings, self.name)
        super().__init__(graphs, descriptors, artifact, torch.device("cpu"))
        log.info("onnxruntime %s: %s, %s networks, providers %s", ort.__version__, model_dir, artifact.precision,
                 ", ".join(self.providers))

    @property
    def providers(self) -> list[str]:
        return self.graphs[UNET].providers

    # -- session construction -------------------------------------------------------

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


def _session_options(ort, level, settings: BackendSettings, opts: OnnxRuntimeOptions):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if settings.threads > 0:
        options.intra_op_num_threads = settings.threads
    if opts.inter_op_threads > 0:
        options.inter_op_num_threads = opts.inter_op_threads
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    return options


def _device_id(device: str) -> int:
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            raise InvalidArgument("device", f"{device!r} is not cuda:N") from None
    return 0


# -- the plug-in ----------------------------------------------------------------------------------


def add_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = OnnxRuntimeOptions()
    group.add_argument("--providers", default=",".join(defaults.providers),
                       help="execution providers in order of preference, comma-separated: tensorrt, cuda, cpu "
                       "(default: every one this onnxruntime build has, in that order)")
    group.add_argument("--graph-optimization", default=defaults.graph_optimization, choices=GRAPH_OPTIMIZATION,
                       help="ONNX Runtime graph optimization level")
    group.add_argument("--inter-op-threads", type=int, default=defaults.inter_op_threads,
                       help="ONNX Runtime inter-op threads (0: default)")
    group.add_argument("--trt-cache-dir", default=defaults.trt_cache_dir,
                       help="where the TensorRT provider caches engines")


def options_from_args(args: argparse.Namespace) -> OnnxRuntimeOptions:
    return OnnxRuntimeOptions(
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        graph_optimization=args.graph_optimization,
        inter_op_threads=args.inter_op_threads,
        trt_cache_dir=args.trt_cache_dir,
    )


PLUGIN = BackendPlugin(
    name="onnxruntime",
    description="directories written by `diffusiond export onnx` or `optimum-cli export onnx`",
    load=OnnxRuntimeBackend,
    options_type=OnnxRuntimeOptions,
    add_arguments=add_arguments,
    options_from_args=options_from_args,
    warm_up=graph.warm_up,
)
