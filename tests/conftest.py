"""Shared fixtures: the built-in model (shipped with the package) and a real server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from diffusiond.client import DiffusionClient
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


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    return ensure_builtin_model()


@pytest.fixture(scope="session")
def server(builtin_dir: Path) -> Iterator[ServerThread]:
    settings = ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))])
    thread = ServerThread(settings)
    thread.start()
    model = thread.server.registry.get("builtin")
    model.pipeline.backend = CountingBackend(model.pipeline.backend)
    yield thread
    thread.stop()


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
