"""OpenVINO backend: runs an ONNX export, or an OpenVINO IR export, with the OpenVINO runtime.

It serves two directory forms, in Optimum's layouts (``text_encoder/``,
``unet/``, ``vae_decoder/``, ``vae_encoder/``):

- an ONNX export (``model.onnx``, from ``diffusiond export onnx`` or
  ``optimum-cli export onnx``), read directly by OpenVINO's ONNX frontend;
- an OpenVINO IR export (``openvino_model.xml`` + ``.bin``, from
  ``diffusiond export openvino``, which also writes the NNCF-quantized INT8
  UNet, or from ``optimum-cli export openvino``).

A diffusers-format directory is refused with the command that converts it:
converting at every start would pay the ONNX trace each time.

What is specific to OpenVINO is here: compiled models and infer requests,
the CPU plugin's precision and performance hints, its model cache, and how it
fails when memory runs out; ``graph.GraphBackend`` does the rest (dtypes at the
float32 boundary, timestep shaping, the VAE mean, artifact checks, warm-up).

Two OpenVINO behaviours decide choices below. Its CPU plugin computes in bf16
by default on CPUs with AMX or AVX512-BF16, so fp32 is asked for explicitly
(``INFERENCE_PRECISION_HINT``). And when it cannot allocate the memory a new
input shape needs it does not raise: the request returns the previous call's
output, or an empty one (measured with OpenVINO 2026.4 under an address-space
limit). Every output's shape is therefore checked against the network's
descriptor, and a mismatch is reported as ``OutOfMemory`` so the pipeline
retries with fewer rows instead of using a stale result. Compiled models are
cached (``CACHE_DIR``) so a restart skips compilation, in one folder per
compile configuration: OpenVINO's cache key omits the precision hint, and a
model cached at fp32 came back as NaN when loaded for bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusiond.backends import cpu_features, graph
from diffusiond.backends.base import BackendPlugin, BackendSettings, translate_out_of_memory
from diffusiond.backends.graph import Artifact, GraphBackend, GraphInput, check_artifact
from diffusiond.errors import FailedPrecondition, InvalidArgument, MissingDependency
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    COMPONENTS,
    REQUIRED_COMPONENTS,
    UNET,
    NetworkDescriptor,
    ShapeProfile,
    descriptors_for,
)
from diffusiond.models.manifest import (
    OPENVINO_FORMAT,
    fused_adapter_set,
    infer_precision,
    manifest_problems,
    read_manifest,
)

log = logging.getLogger(__name__)

IR_FILE = "openvino_model.xml"
ONNX_FILE = "model.onnx"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
PERFORMANCE_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
# How OpenVINO words the failures it does raise for memory (a C++ std::bad_alloc, the CPU plugin's
# allocator); the silent ones are caught by the output-shape check and raised as StaleOutput.
_OOM_MARKERS = ("bad_alloc", "out of memory", "failed to allocate", "cannot allocate", "could not allocate")


@dataclass(frozen=True)
class OpenVinoOptions:
    """OpenVINO compile choices (plain data: importing this needs no openvino)."""

    device_name: str = "CPU"  # an OpenVINO device ("CPU"; "GPU" where its plugin is installed, untested here)
    # "fp32" or "bf16" (CPUs with AVX512-BF16 or AMX only); empty: --dtype's (fp32 unless --dtype bf16).
    precision_hint: str = ""
    # "latency": each call runs as one request on all threads. "throughput": several streams, and a
    # call's rows are split across them (pays off with many cores and batched calls).
    performance_hint: str = "latency"
    streams: int = 0  # 0: what the performance hint picks
    cache_dir: str = ""  # compiled-model cache; empty: <diffusiond cache>/openvino
    cache: bool = True  # False: compile at every start


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise MissingDependency("openvino", "the openvino backend", "openvino") from None
    return openvino


class StaleOutput(RuntimeError):
    """OpenVINO returned an output that does not belong to this call (it could not allocate for it)."""


def is_ov_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, StaleOutput):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_MARKERS)


def resolve_precision_hint(options: OpenVinoOptions, settings: BackendSettings) -> str:
    """The precision the networks compute in: the option, else ``--dtype``; bf16 only on CPUs that have it."""
    from_dtype = settings.dtype or "fp32"
    hint = options.precision_hint or from_dtype
    if hint not in PRECISION_HINTS:
        what = "precision_hint" if options.precision_hint else "dtype"
        raise InvalidArgument(what, f"{hint!r} is not one the openvino backend computes in; use "
                              f"{' or '.join(PRECISION_HINTS)}")
    if options.precision_hint and from_dtype not in ("fp32", options.precision_hint):
        raise InvalidArgument("dtype", f"--dtype {from_dtype} contradicts --ov-precision-hint {options.precision_hint}")
    if hint == "bf16" and options.device_name.upper() == "CPU" and not cpu_features.has_native_bf16():
        raise FailedPrecondition(
            f"bf16 was asked for, but this CPU ({cpu_features.describe()}) has neither AVX512-BF16 nor AMX, "
            "so OpenVINO would emulate it slower than fp32; use --ov-precision-hint fp32"
        )
    return hint


def cache_key(device: str, config: Mapping[str, str]) -> str:
    """A folder name per device and compile configuration. OpenVINO's own cache key leaves the precision
    hint out (2026.4, CPU): a model cached at f32 was loaded for a bf16 compile and gave NaN."""
    return "-".join([device.lower(), *(f"{k.lower()}={v.lower()}" for k, v in sorted(config.items()))])


def network_file(model_dir: Path, component: str) -> Path | None:
    """The component's IR file if there is one, else its ONNX file, else None."""
    for name in (IR_FILE, ONNX_FILE):
        path = model_dir / component / name
        if path.is_file():
            return path
    return None


def ir_precision(ov, model) -> str:
    """Precision of an IR without a manifest (e.g. Optimum-Intel's): FakeQuantize or int8 weights, fp16 weights."""
    ops = model.get_ordered_ops()
    if any(op.get_type_name() == "FakeQuantize" for op in ops):
        return "int8"
    constants = {op.get_output_element_type(0) for op in ops if op.get_type_name() == "Constant"}
    if constants & {ov.Type.i8, ov.Type.u8}:
        return "int8"
    if ov.Type.f16 in constants:
        return "fp16"
    return "fp32"


def _torch_dtype(ov, element_type) -> torch.dtype:
    table = {
        ov.Type.f32: torch.float32, ov.Type.f16: torch.float16, ov.Type.bf16: torch.bfloat16,
        ov.Type.f64: torch.float64, ov.Type.i64: torch.int64, ov.Type.i32: torch.int32,
    }
    if element_type not in table:
        raise FailedPrecondition(f"tensor type {element_type} is not one diffusiond feeds")
    return table[element_type]


def split_rows(feeds: Mapping[str, torch.Tensor], batched: set[str], parts: int) -> list[dict[str, torch.Tensor]]:
    """``feeds`` cut into at most ``parts`` calls along the rows of the ``batched`` inputs (others go whole)."""
    rows = {feeds[n].shape[0] for n in batched if n in feeds and feeds[n].dim() > 0}
    if parts <= 1 or len(rows) != 1 or (total := rows.pop()) < 2:
        return [dict(feeds)]
    step = -(-total // min(parts, total))
    return [
        {name: t[start : start + step] if name in batched else t for name, t in feeds.items()}
        for start in range(0, total, step)
    ]


class OvGraph:
    """One compiled model and its infer requests; runs named torch tensors on the host.

    With the latency hint there is one request; with the throughput hint as many as OpenVINO
    suggests, and a call's rows are split across them and run at once.
    """

    def __init__(self, ov, compiled, path: Path, parallel: bool, known_names: set[str]) -> None:
        self.path = path
        self.compiled = compiled
        self.inputs: dict[str, GraphInput] = {}
        self.batched: set[str] = set()  # inputs whose first dimension is dynamic (rows)
        for port in compiled.inputs:
            name = port_name(port, known_names)
            shape = port.get_partial_shape()
            dims = tuple(d.get_length() if d.is_static else None for d in shape) if shape.rank.is_static else (None,)
            self.inputs[name] = GraphInput(name, _torch_dtype(ov, port.get_element_type()), dims)
            if dims and dims[0] is None:
                self.batched.add(name)
        self.outputs = [port_name(port, known_names) for port in compiled.outputs]
        count = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if parallel else 1
        self.requests = [compiled.create_infer_request() for _ in range(max(1, count))]
        self._lock = threading.Lock()  # a request runs one call at a time

    def run(self, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        chunks = split_rows(feeds, self.batched, len(self.requests))
        with self._lock:
            if len(chunks) == 1:
                return self._infer(self.requests[0], chunks[0], output)
            arrays = [_arrays(chunk) for chunk in chunks]  # kept alive until every request has read them
            for request, inputs in zip(self.requests, arrays):
                request.start_async(inputs, share_inputs=True)
            for request in self.requests[: len(chunks)]:
                request.wait()
            return torch.cat([_output(request, output) for request in self.requests[: len(chunks)]])

    @staticmethod
    def _infer(request, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        request.infer(_arrays(feeds), share_inputs=True)
        return _output(request, output)


def port_name(port, known: set[str]) -> str:
    """A port's name as diffusiond knows it: a tensor of an ONNX graph may carry several (its graph
    name and internal ones such as ``/model/Reshape_output_0``)."""
    names = port.get_names()
    return next((n for n in sorted(names) if n in known), None) or min(names, key=lambda n: (n.startswith("/"), len(n)))


def _arrays(feeds: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in feeds.items()}


def _output(request, name: str) -> torch.Tensor:
    # The request owns this buffer and reuses it on its next call: copy it out.
    return torch.from_numpy(np.array(request.get_tensor(name).data, copy=True))


def expected_output_shape(descriptor: NetworkDescriptor, output: str, feeds: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape ``output`` must have for ``feeds``, from the descriptor's symbols; None if it cannot tell
    (an output name the descriptor does not list). A symbol takes its first input's size: a graph's
    one-per-call timestep ([1] or a scalar) does not say how many rows the sample has."""
    spec = next((t for t in descriptor.outputs if t.name == output), None)
    if spec is None:
        return None
    sizes: dict[str, int] = {}
    for t in descriptor.inputs:
        value = feeds.get(t.name)
        if value is None or value.dim() != len(t.dims):
            continue
        for d, n in zip(t.dims, value.shape):
            if isinstance(d, str):
                sizes.setdefault(d, int(n))
    f = descriptor.dims.vae_scale_factor
    for pixels, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in sizes:
            sizes.setdefault(pixels, sizes[latent] * f)
        elif pixels in sizes:
            sizes[latent] = sizes[pixels] // f
    try:
        return spec.shape(sizes)
    except KeyError:
        return None


class OpenVinoBackend(GraphBackend):
    """Runs Optimum-layout ONNX or OpenVINO IR networks with OpenVINO."""

    name = "openvino"
    is_runtime_out_of_memory = staticmethod(is_ov_out_of_memory)

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        ov = import_openvino()
        opts = settings.options if settings.options is not None else OpenVinoOptions()
        if settings.device != "cpu":
            raise InvalidArgument("device", f"the openvino backend hands tensors over on the host: use --device cpu "
                                  f"and choose the OpenVINO device with --ov-device (got {settings.device!r})")
        if opts.performance_hint not in PERFORMANCE_HINTS:
            raise InvalidArgument("performance_hint", f"{opts.performance_hint!r} is not one of "
                                  f"{', '.join(PERFORMANCE_HINTS)}")
        self.precision_hint = resolve_precision_hint(opts, settings)
        settings = dataclasses.replace(settings, dtype="fp32")  # consumed here: check_artifact need not warn
        unet_file = network_file(model_dir, UNET)
        if unet_file is None:
            hint = (" (a diffusers-format model: convert it first with `diffusiond export openvino`)"
                    if (model_dir / "unet").is_dir() else "")
            raise FailedPrecondition(f"{model_dir} holds no {UNET}/{IR_FILE} or {UNET}/{ONNX_FILE}: "
                                     f"not an OpenVINO or ONNX export{hint}")
        kind = "OpenVINO IR export" if unet_file.name == IR_FILE else "ONNX export"
        manifest = read_manifest(model_dir)
        if manifest is not None and (manifest.format == OPENVINO_FORMAT) != (kind == "OpenVINO IR export"):
            raise FailedPrecondition(f"{model_dir}: its manifest is of format {manifest.format}, but it holds "
                                     f"{unet_file.name} files")
        if manifest is not None:
            profile = ShapeProfile.from_json(manifest.profile)
            check_artifact(Artifact(model_dir, kind, manifest.precision, manifest.source_sha256, profile,
                                    tuple(manifest_problems(model_dir, manifest))), settings, self.name)
        else:
            profile = ShapeProfile.around(load_model_config(model_dir).default_size)
            absent = [c for c in REQUIRED_COMPONENTS if network_file(model_dir, c) is None]
            if absent:
                raise FailedPrecondition(f"{model_dir} has no network file for {', '.join(absent)}")
            log.warning("%s has no manifest.json (not exported by diffusiond): serving it unchecked; "
                        "source, precision and tool versions are unknown", model_dir)

        core = ov.Core()
        config = self._compile_config(opts, settings)
        cache = self.cache_dir(opts) / cache_key(opts.device_name, config) if opts.cache else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        parallel = opts.performance_hint == "throughput"
        descriptors = descriptors_for(model_dir)
        graphs: dict[str, OvGraph] = {}
        started = time.perf_counter()
        for component in COMPONENTS:
            path = network_file(model_dir, component)
            if path is None:
                continue
            try:
                compiled = core.compile_model(str(path), opts.device_name, config)
            except Exception as exc:  # unknown device, unsupported op, corrupt file...
                raise FailedPrecondition(f"OpenVINO cannot compile {path} for {opts.device_name}: {exc}") from None
            d = descriptors[component]
            known = {*d.input_names, *d.output_names, *graph.ALTERNATIVE_OUTPUTS.get(component, ())}
            graphs[component] = OvGraph(ov, compiled, path, parallel, known)

        if manifest is not None:
            artifact = Artifact(model_dir, kind, manifest.precision, manifest.source_sha256, profile,
                                adapters=fused_adapter_set(manifest.adapters))
        else:  # the precision is judged from the graph
            if kind == "ONNX export":
                precision = infer_precision(unet_file)
            else:
                precision = ir_precision(ov, core.read_model(str(unet_file)))
            artifact = Artifact(model_dir, kind, precision, None, profile)
            check_artifact(artifact, settings, self.name)
        super().__init__(graphs, descriptors, artifact, torch.device("cpu"))
        unet = graphs[UNET].compiled
        log.info(
            "openvino %s: %s (%s, %s networks) compiled in %.1fs for %s: computing in %s, %s hint, %s streams, "
            "%s threads, %d infer request(s)%s",
            ov.get_version(), model_dir, kind, artifact.precision, time.perf_counter() - started, opts.device_name,
            unet.get_property("INFERENCE_PRECISION_HINT"), opts.performance_hint, unet.get_property("NUM_STREAMS"),
            unet.get_property("INFERENCE_NUM_THREADS"), len(graphs[UNET].requests),
            f", model cache {cache}" if cache is not None else "",
        )

    @staticmethod
    def cache_dir(opts: OpenVinoOptions) -> Path:
        from diffusiond.models.builtin import cache_root

        return Path(opts.cache_dir) if opts.cache_dir else cache_root() / "openvino"

    def _compile_config(self, opts: OpenVinoOptions, settings: BackendSettings) -> dict[str, str]:
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision_hint],
            "PERFORMANCE_HINT": PERFORMANCE_HINTS[opts.performance_hint],
        }
        if settings.threads > 0:
            config["INFERENCE_NUM_THREADS"] = str(settings.threads)
        if opts.streams > 0:
            config["NUM_STREAMS"] = str(opts.streams)
        return config

    @property
    def dtype_name(self) -> str:
        """What the networks compute in: an INT8 UNet says int8; otherwise bf16 when asked for, else the files'."""
        if self.precision_hint == "bf16" and self.artifact.precision != "int8":
            return "bf16"
        return self.artifact.precision

    def _run(self, component: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        out = super()._run(component, feeds)
        want = expected_output_shape(self._descriptors[component], self._outputs[component], feeds)
        if want is not None and tuple(out.shape) != want:
            with translate_out_of_memory(component, self.is_runtime_out_of_memory):
                raise StaleOutput(
                    f"OpenVINO returned {self._outputs[component]} of shape {list(out.shape)} where "
                    f"{list(want)} was due: it does so when it cannot allocate memory for a call"
                )
        return out


# -- the plug-in ----------------------------------------------------------------------------------


def add_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = OpenVinoOptions()
    group.add_argument("--ov-device", default=defaults.device_name,
                       help="OpenVINO device to compile for (default: %(default)s)")
    group.add_argument("--ov-precision-hint", default=defaults.precision_hint, choices=["", *PRECISION_HINTS],
                       help="what OpenVINO computes in: fp32, or bf16 on CPUs with AVX512-BF16/AMX "
                       "(default: --dtype's)")
    group.add_argument("--ov-performance-hint", default=defaults.performance_hint, choices=list(PERFORMANCE_HINTS),
                       help="latency: each call on all threads; throughput: streams, a call's rows split "
                       "across them (default: %(default)s)")
    group.add_argument("--ov-streams", type=int, default=defaults.streams,
                       help="OpenVINO streams (0: the performance hint's choice)")
    group.add_argument("--ov-cache-dir", default=defaults.cache_dir,
                       help="where compiled models are cached (default: a folder under the diffusiond cache)")
    group.add_argument("--ov-no-cache", action="store_true", help="compile at every start, cache nothing")


def options_from_args(args: argparse.Namespace) -> OpenVinoOptions:
    return OpenVinoOptions(
        device_name=args.ov_device,
        precision_hint=args.ov_precision_hint,
        performance_hint=args.ov_performance_hint,
        streams=args.ov_streams,
        cache_dir=args.ov_cache_dir,
        cache=not args.ov_no_cache,
    )


PLUGIN = BackendPlugin(
    name="openvino",
    description="ONNX exports (`diffusiond export onnx`) or OpenVINO IR exports (`diffusiond export openvino`), "
    "run by OpenVINO",
    load=OpenVinoBackend,
    options_type=OpenVinoOptions,
    add_arguments=add_arguments,
    options_from_args=options_from_args,
    warm_up=graph.warm_up,
)
