"""Shared fixtures: the built-in model (shipped with the package) and a real server on loopback."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from diffusiond.client import DiffusionClient
from diffusiond.errors import OutOfMemory
from diffusiond.models.builtin import ensure_builtin_model
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread

torch.set_num_threads(2)


class CountingBackend:
    """Wraps a backend: counts UNet calls and can run a hook before each one."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.unet_calls = 0
        self.before_unet: Callable[[int], None] | None = None
        self._lock = threading.Lock()

    def unet(self, sample, timestep, encoder_hidden_states):
        with self._lock:
            self.unet_calls += 1
            n = self.unet_calls
        if self.before_unet is not None:
            self.before_unet(n)
        return self.inner.unet(sample, timestep, encoder_hidden_states)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FaultyBackend:
    """Wraps a backend: records each network call's batch rows, can hold a UNet call, and can
    run out of memory the way every backend reports it (``diffusiond.errors.OutOfMemory``)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.unet_rows: list[int] = []  # rows of every UNet call that ran
        self.decode_rows: list[int] = []  # images of every VAE decode that ran
        self.ooms = 0  # injected out-of-memory errors
        self.before_unet: Callable[[torch.Tensor], None] | None = None
        self.unet_oom: Callable[[torch.Tensor], bool] | None = None  # sample -> raise?
        self.decode_oom: Callable[[torch.Tensor], bool] | None = None  # latents -> raise?

    def reset(self) -> None:
        self.unet_rows.clear()
        self.decode_rows.clear()
        self.ooms = 0
        self.before_unet = self.unet_oom = self.decode_oom = None

    def _oom(self, what: str) -> OutOfMemory:
        self.ooms += 1
        return OutOfMemory(f"CUDA out of memory in {what} (injected by the test)")

    def unet(self, sample, timestep, encoder_hidden_states):
        if self.before_unet is not None:
            self.before_unet(sample)
        if self.unet_oom is not None and self.unet_oom(sample):
            raise self._oom("unet")
        self.unet_rows.append(sample.shape[0])
        return self.inner.unet(sample, timestep, encoder_hidden_states)

    def vae_decode(self, latents):
        if self.decode_oom is not None and self.decode_oom(latents):
            raise self._oom("vae_decode")
        self.decode_rows.append(latents.shape[0])
        return self.inner.vae_decode(latents)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    return ensure_builtin_model()


@contextlib.contextmanager
def running_server(settings: ServerSettings, wrapper: Callable | None = None) -> Iterator[ServerThread]:
    """A real server on a loopback port; ``wrapper`` (e.g. CountingBackend) wraps the first model's backend."""
    thread = ServerThread(settings)
    thread.start()
    if wrapper is not None:
        model = next(iter(thread.server.registry))
        model.pipeline.backend = wrapper(model.pipeline.backend)
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def server(builtin_dir: Path) -> Iterator[ServerThread]:
    settings = ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))])
    with running_server(settings, CountingBackend) as thread:
        yield thread


@pytest.fixture(scope="session")
def model(server: ServerThread):
    return server.server.registry.get("builtin")


@pytest.fixture(scope="session")
def counting(model) -> CountingBackend:
    return model.pipeline.backend


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[DiffusionClient]:
    with DiffusionClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def pipeline(model):
    """The server's own pipeline, for tests that need no RPC."""
    return model.pipeline


# -- ONNX exports of the built-in model (each made once per session, on first use) --------------

# INT8 calibration sized for a test: the recipe's form (every step, both guidance halves), fewer prompts.
TEST_CALIBRATION = dict(max_prompts=16, steps=8, method="minmax")


@pytest.fixture(scope="session")
def onnx_export(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``onnx_export("fp32" | "fp16" | "int8")`` -> the built-in model exported at that precision."""
    from diffusiond.export.calibration import CalibrationSettings
    from diffusiond.export.onnx_export import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("onnx")
    # Calibration ranges are cached under the diffusiond cache: keep this session's to itself.
    os.environ["DIFFUSIOND_CACHE"] = str(root / "cache")
    made: dict[str, Path] = {}
    lock = threading.Lock()

    def get(precision: str) -> Path:
        with lock:
            if precision not in made:
                options = ExportOptions(precision=precision, calibration=CalibrationSettings(**TEST_CALIBRATION))
                made[precision] = export_onnx(builtin_dir, root / precision, options).directory
            return made[precision]

    return get


@pytest.fixture(scope="session")
def openvino_export(builtin_dir: Path, onnx_export, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``openvino_export("fp32" | "int8")`` -> the built-in model as OpenVINO IR (int8: an NNCF UNet calibrated like
    the ONNX INT8 export). Minutes with int8: for slow tests. Depends on ``onnx_export``, which points the
    diffusiond cache at this session's own folder."""
    from diffusiond.export.calibration import CalibrationSettings
    from diffusiond.export.openvino_export import OpenVinoExportOptions, export_openvino

    root = tmp_path_factory.mktemp("openvino")
    made: dict[str, Path] = {}
    lock = threading.Lock()

    def get(precision: str) -> Path:
        with lock:
            if precision not in made:
                options = OpenVinoExportOptions(precision=precision, calibration=CalibrationSettings(**TEST_CALIBRATION))
                made[precision] = export_openvino(builtin_dir, root / precision, options).directory
            return made[precision]

    return get


@pytest.fixture(scope="session")
def raw_channel(server: ServerThread) -> Iterator[grpc.Channel]:
    """A channel that sends bytes as they are (no protobuf serialisation): for corrupt-input tests."""
    channel = grpc.insecure_channel(server.address)
    yield channel
    channel.close()
