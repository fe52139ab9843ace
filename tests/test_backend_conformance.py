"""Every backend that can run here, held to the same contract.

At the boundary: float32 tensors of the right shapes on the backend's device.
Rows are independent: rows at different timesteps in one UNet call give what
each gives alone, and permuting the rows permutes the outputs. Parity with
eager PyTorch fp32 within each precision's stated tolerance. A runtime's own
out-of-memory failure comes out as ``OutOfMemory``. Adding a backend means
adding its case here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

from diffusiond.backends import cpu_features
from diffusiond.backends.base import BackendSettings, translate_out_of_memory
from diffusiond.backends.registry import create_backend, plugins, warm_up
from diffusiond.errors import OutOfMemory
from diffusiond.models.config import load_model_config

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
NETWORKS = ("text_encoder", "unet", "vae_decode", "vae_encode")


def tolerances(default: float, **networks: float) -> dict[str, float]:
    return {name: networks.get(name, default) for name in NETWORKS}


@dataclass(frozen=True)
class Case:
    id: str
    backend: str
    precision: str
    # Largest |got - eager fp32| relative to eager's largest |output|, per network, on the inputs below.
    parity: dict[str, float]
    # The same measure between a row run with others and alone, or in another row order.
    rows: float
    settings: BackendSettings = field(default_factory=BackendSettings)
    # What it serves, where the backend takes more than one kind: "onnx" (an ONNX export of ``precision``),
    # "openvino" (an OpenVINO IR export of ``precision``); empty: the backend's one kind.
    artifact: str = ""
    slow: bool = False  # long to set up (a real compile, a calibration): only with -m slow


# Measured on the built-in model (CPU, ONNX Runtime 1.32, torch 2.13), bounds about 10x above:
# fp32 at most 7e-6 (any network); fp16 5e-4 (text encoder and UNet; the VAE stays fp32 by
# force_upcast); int8 1.9e-2 (UNet; the rest is fp32); rows alone or permuted: 0 on ONNX Runtime,
# 2e-6 on torch. The int8 row bound leaves room for a rounding flip across a quantization step.
# OpenVINO 2026.4 (Sapphire Rapids): fp32 8e-6; bf16 9e-3 (text encoder), 7e-3 (UNet), 0.10 (VAE
# decoder: eager PyTorch bf16 measures 0.094 on the same input, a bf16 matter, not OpenVINO's), 7e-3
# (VAE encoder); INT8 UNet 2.0e-2 (NNCF), 2e-2 (the ONNX QDQ export); rows alone or permuted: 0.
# torch.compile (Inductor, fused QKV, channels_last): 1.1e-6.
CASES = [
    Case("torch-fp32", "torch", "fp32", tolerances(1e-4), rows=1e-4),
    Case("torch-compiled-fp32", "torch-compiled", "fp32", tolerances(1e-4), rows=1e-4, slow=True),
    Case("onnxruntime-fp32", "onnxruntime", "fp32", tolerances(1e-4), rows=1e-4),
    Case("onnxruntime-fp16", "onnxruntime", "fp16", tolerances(1e-4, text_encoder=5e-3, unet=5e-3), rows=1e-3),
    Case("onnxruntime-int8", "onnxruntime", "int8", tolerances(1e-4, unet=0.1), rows=2e-2),
    Case("openvino-fp32", "openvino", "fp32", tolerances(1e-4), rows=1e-4, artifact="onnx"),
    Case("openvino-bf16", "openvino", "bf16", tolerances(5e-2, vae_decode=0.3), rows=1e-2, artifact="onnx",
         settings=BackendSettings(dtype="bf16")),
    Case("openvino-int8-onnx", "openvino", "int8", tolerances(1e-4, unet=0.1), rows=2e-2, artifact="onnx"),
    Case("openvino-int8-nncf", "openvino", "int8", tolerances(1e-4, unet=0.1), rows=2e-2, artifact="openvino",
         slow=True),
    # Not measured here (no GPU): fp16 engines, whose fp32 layers may use TF32.
    Case("tensorrt-fp16", "tensorrt", "fp16", tolerances(1e-2), rows=1e-2, settings=BackendSettings(device="cuda")),
]
# A row's output at another timestep differs by at least this (measured 0.11 and more on the
# inputs below): a backend that gave every row the first row's timestep fails the mixed-timestep test.
DISTINCT_TIMESTEPS_MIN_DIFFERENCE = 0.05
assert all(case.rows < DISTINCT_TIMESTEPS_MIN_DIFFERENCE for case in CASES)

PROMPTS = [
    "",
    "a large red circle on a blue background, top left",
    "a small green square on a white background, bottom right",
    "a blue triangle on a yellow background, centre",
]
TIMESTEPS = [999.0, 641.0, 250.0, 21.0]
ORT_ARENA_OOM = (  # what ONNX Runtime 1.32 raised (as its Fail) when its CPU arena was capped below a call's needs
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. Name:'' "
    "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
    "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Available memory of "
    "3145728 is smaller than requested bytes of 16777216"
)
TORCH_CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.19 GiB is free."
)


def parametrize_cases(fn):
    """Run ``fn`` for every case: ``case`` is the Case, ``backend`` its loaded backend."""
    params = []
    for case in CASES:
        marks = []
        if case.backend == "tensorrt" and not HAVE_TENSORRT:
            marks.append(pytest.mark.skip(reason="TensorRT and a CUDA GPU are not available"))
        if case.backend == "openvino" and not HAVE_OPENVINO:
            marks.append(pytest.mark.skip(reason="OpenVINO is not installed (pip install 'diffusiond[openvino]')"))
        if case.settings.dtype == "bf16" and not cpu_features.has_native_bf16():
            marks.append(pytest.mark.skip(reason=f"this CPU has no native bf16 ({cpu_features.describe()})"))
        if case.slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case, case, id=case.id, marks=marks))
    return pytest.mark.parametrize("case, backend", params, indirect=["backend"])(fn)


@dataclass
class Inputs:
    input_ids: torch.Tensor  # [4, T] int64, T the model's text length (32)
    sample: torch.Tensor  # [4, 4, h, w], the native latent (16x16)
    timestep: torch.Tensor  # [4], all different
    context: torch.Tensor  # [4, T, D]: the eager text encoder's encoding of PROMPTS
    latents: torch.Tensor  # [2, 4, h, w]
    images: torch.Tensor  # [2, 3, 64, 64]

    def on(self, device: torch.device) -> Inputs:
        return Inputs(*(t.to(device) for t in vars(self).values()))


def run_all(backend, x: Inputs) -> dict[str, torch.Tensor]:
    return {
        "text_encoder": backend.text_encoder(x.input_ids),
        "unet": backend.unet(x.sample, x.timestep, x.context),
        "vae_decode": backend.vae_decode(x.latents),
        "vae_encode": backend.vae_encode(x.images),
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).abs().max() / want.float().abs().max())


@pytest.fixture(scope="module")
def backends(builtin_dir, onnx_export, openvino_export, tmp_path_factory):
    made = {}

    def get(case: Case):
        if case.id not in made:
            if case.backend in ("torch", "torch-compiled"):
                model_dir = builtin_dir
            elif case.backend == "onnxruntime" or case.artifact == "onnx":
                model_dir = onnx_export("fp32" if case.precision == "bf16" else case.precision)
            elif case.artifact == "openvino":
                model_dir = openvino_export(case.precision)
            else:
                from diffusiond.export.tensorrt_build import (
                    EngineBuildOptions,
                    build_engines,
                )

                model_dir = tmp_path_factory.mktemp("trt") / case.precision
                build_engines(onnx_export(case.precision), model_dir,
                              EngineBuildOptions(workspace_gib=1.0, optimization_level=2))
            made[case.id] = create_backend(case.backend, model_dir, case.settings)
        return made[case.id]

    yield get
    for backend in made.values():
        backend.close()


@pytest.fixture
def backend(backends, request):
    return backends(request.param)


@pytest.fixture(scope="module")
def inputs(backends, builtin_dir) -> Inputs:
    from transformers import CLIPTokenizer

    eager = backends(CASES[0])
    config = load_model_config(builtin_dir)
    tokenizer = CLIPTokenizer.from_pretrained(builtin_dir / "tokenizer")
    ids = torch.tensor(tokenizer(PROMPTS, padding="max_length", max_length=config.text_max_length,
                                 truncation=True).input_ids)
    g = torch.Generator().manual_seed(0)
    side = config.unet_sample_size
    return Inputs(
        input_ids=ids,
        sample=torch.randn(4, 4, side, side, generator=g),
        timestep=torch.tensor(TIMESTEPS),
        context=eager.text_encoder(ids),
        latents=torch.randn(2, 4, side, side, generator=g),
        images=torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
    )


@pytest.fixture(scope="module")
def eager_outputs(backends, inputs) -> dict[str, torch.Tensor]:
    return run_all(backends(CASES[0]), inputs)


@parametrize_cases
def test_outputs_at_the_boundary_are_float32_on_the_backends_device(case, backend, inputs):
    x = inputs.on(backend.device)
    tokens, hidden = x.context.shape[1:]
    latent = tuple(x.sample.shape[1:])
    expected = {
        "text_encoder": (4, tokens, hidden), "unet": (4, *latent), "vae_decode": (2, 3, 64, 64),
        "vae_encode": (2, *latent),
    }
    where = torch.empty(0, device=backend.device).device
    for name, out in run_all(backend, x).items():
        assert tuple(out.shape) == expected[name], name
        assert out.dtype == torch.float32 and out.device == where, name
        assert torch.isfinite(out).all(), name
    assert backend.dtype_name == case.precision


@parametrize_cases
def test_rows_at_different_timesteps_in_one_call_match_each_row_alone(case, backend, inputs):
    x = inputs.on(backend.device)
    together = backend.unet(x.sample, x.timestep, x.context)
    scale = together.abs().max()
    for i in range(len(TIMESTEPS)):
        alone = backend.unet(x.sample[i : i + 1], x.timestep[i : i + 1], x.context[i : i + 1])
        assert float((alone[0] - together[i]).abs().max() / scale) <= case.rows, i
    # The test can tell: had every row been given the first row's timestep, rows 1-3 would differ this much.
    shared = backend.unet(x.sample, x.timestep[:1].expand(len(TIMESTEPS)), x.context)
    differs = (shared - together).abs().amax(dim=(1, 2, 3))[1:] / scale
    assert (differs > DISTINCT_TIMESTEPS_MIN_DIFFERENCE).all(), differs


@parametrize_cases
def test_permuting_the_rows_permutes_the_outputs(case, backend, inputs):
    x = inputs.on(backend.device)
    order = torch.tensor([2, 0, 3, 1], device=backend.device)
    unet = backend.unet(x.sample, x.timestep, x.context)
    assert relative_error(backend.unet(x.sample[order], x.timestep[order], x.context[order]), unet[order]) <= case.rows
    text = backend.text_encoder(x.input_ids)
    assert relative_error(backend.text_encoder(x.input_ids[order]), text[order]) <= case.rows
    swap = torch.tensor([1, 0], device=backend.device)
    decoded = backend.vae_decode(x.latents)
    assert relative_error(backend.vae_decode(x.latents[swap]), decoded[swap]) <= case.rows


@parametrize_cases
def test_parity_with_eager_fp32(case, backend, inputs, eager_outputs):
    got = run_all(backend, inputs.on(backend.device))
    for name, want in eager_outputs.items():
        error = relative_error(got[name], want)
        assert error <= case.parity[name], f"{name}: relative error {error:.2e} above {case.parity[name]:.0e}"


def inject_unet_out_of_memory(backend, monkeypatch) -> None:
    """Make the UNet fail the way the backend's runtime does when memory runs out."""
    if backend.name in ("torch", "torch-compiled"):
        def forward(*args, **kwargs):
            raise torch.OutOfMemoryError(TORCH_CUDA_OOM)

        monkeypatch.setattr(backend._unet, "forward", forward)
    elif backend.name == "openvino":
        graph = backend.graphs["unet"]

        class FailedAllocation:  # what OpenVINO 2026.4 does when it cannot allocate: no error, no new output
            def __init__(self, fresh) -> None:
                self.fresh = fresh

            def infer(self, *args, **kwargs) -> None:
                pass

            def get_tensor(self, name):
                return self.fresh.get_tensor(name)  # never run: empty, as after a failed first allocation

        monkeypatch.setattr(graph, "requests", [FailedAllocation(graph.compiled.create_infer_request())])
    elif backend.name == "onnxruntime":
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail

        def run(*args, **kwargs):
            raise Fail(ORT_ARENA_OOM)

        monkeypatch.setattr(backend.graphs["unet"].session, "run", run)
    elif backend.name == "tensorrt":
        import tensorrt as trt

        graph = backend.graphs["unet"]

        class OutOfMemoryContext:  # TensorRT logs the failed allocation and returns False
            def __init__(self, inner) -> None:
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def execute_async_v3(self, stream: int) -> bool:
                graph._logger.log(trt.ILogger.ERROR,
                                  "[defaultAllocator.cpp::allocate::31] Error Code 1: Cuda Runtime (out of memory)")
                return False

        monkeypatch.setattr(graph, "context", OutOfMemoryContext(graph.context))
    else:
        raise AssertionError(f"no out-of-memory fault for the {backend.name} backend: add one")


@parametrize_cases
def test_the_runtimes_out_of_memory_error_becomes_out_of_memory(case, backend, inputs, monkeypatch):
    x = inputs.on(backend.device)
    inject_unet_out_of_memory(backend, monkeypatch)
    with pytest.raises(OutOfMemory, match="unet ran out of memory") as raised:
        backend.unet(x.sample, x.timestep, x.context)
    assert isinstance(raised.value, MemoryError)
    monkeypatch.undo()
    assert backend.unet(x.sample, x.timestep, x.context).shape == x.sample.shape  # and it goes on


@parametrize_cases
def test_the_plugins_warm_up_runs_each_network_at_the_optimal_shapes(case, backend, monkeypatch, builtin_dir):
    rows = []
    unet = backend.unet
    monkeypatch.setattr(backend, "unet", lambda sample, *rest: rows.append(sample.shape) or unet(sample, *rest))
    warm_up(backend)
    if plugins()[case.backend].warm_up is None:  # none of its own: the server's first generation is it
        assert rows == []
        return
    factor = load_model_config(builtin_dir).vae_scale_factor
    if case.backend == "torch-compiled":  # it compiles two row counts (see its warm_up_rows)
        profile = backend.profile
        latent = (profile.height.opt // factor, profile.width.opt // factor)
        assert rows == [(2 * profile.images.opt, 4, *latent), (2 * profile.images.max, 4, *latent)]
        return
    profile = backend.artifact.profile
    latent = (profile.height.opt // factor, profile.width.opt // factor)
    assert rows == [(2 * profile.images.opt, 4, *latent)]  # the guided UNet: two rows per image


# -- the conversion itself ---------------------------------------------------------------------------------


def test_only_out_of_memory_errors_are_converted():
    with pytest.raises(OutOfMemory, match="vae_decode ran out of memory: CUDA out of memory"):
        with translate_out_of_memory("vae_decode"):
            raise torch.OutOfMemoryError(TORCH_CUDA_OOM)
    with pytest.raises(OutOfMemory, match="unet ran out of memory"):
        with translate_out_of_memory("unet"):
            raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not memory: passes unchanged
        with translate_out_of_memory("unet", lambda exc: "memory" in str(exc)):
            raise RuntimeError("shape mismatch")
    with pytest.raises(OutOfMemory):
        with translate_out_of_memory("unet", lambda exc: "memory" in str(exc)):
            raise RuntimeError("no memory left")


def test_the_failed_calls_frames_are_not_kept():
    """The caller retries with fewer rows: the exception must not hold the failed call's tensors."""
    import gc
    import weakref

    def failing_call():
        intermediate = torch.empty(1024)
        failing_call.ref = weakref.ref(intermediate)
        raise torch.OutOfMemoryError(TORCH_CUDA_OOM)

    try:
        with translate_out_of_memory("unet"):
            failing_call()
    except OutOfMemory as exc:
        assert exc.__cause__ is None
        gc.collect()
        assert failing_call.ref() is None
