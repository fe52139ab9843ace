"""Backends are plug-ins: one file declares a backend's name, options, flags and warm-up, and the
registry, the CLI and ``create_backend`` take it from there with no other edit."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import diffusiond.backends
from diffusiond.backends import registry
from diffusiond.backends.base import BackendPlugin, BackendSettings
from diffusiond.backends.onnxruntime import OnnxRuntimeOptions
from diffusiond.backends.registry import (
    create_backend,
    plugins,
    register,
    unregister,
    warm_up,
)
from diffusiond.cli import backend_settings_from_args, build_parser, main
from diffusiond.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class EchoOptions:
    gain: float = 1.0


class EchoBackend:
    """A backend in a dozen lines: returns its inputs times ``gain`` (shapes as the protocol says)."""

    name = "echo"
    device = torch.device("cpu")
    dtype_name = "fp32"

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        self.model_dir = model_dir
        self.options: EchoOptions = settings.options
        self.warmed = False

    def unet(self, sample, timestep, encoder_hidden_states):
        return sample * self.options.gain

    def close(self) -> None:
        pass


def add_echo_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--echo-gain", type=float, default=EchoOptions.gain, help="what the echo multiplies by")


ECHO = BackendPlugin(
    name="echo",
    description="returns its inputs (a test backend)",
    load=EchoBackend,
    options_type=EchoOptions,
    add_arguments=add_echo_arguments,
    options_from_args=lambda args: EchoOptions(gain=args.echo_gain),
    warm_up=lambda backend: setattr(backend, "warmed", True),
)


@pytest.fixture
def echo():
    register(ECHO)
    yield ECHO
    unregister(ECHO.name)


def serve_help(capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_the_built_in_backends_are_found_in_their_files():
    found = plugins()
    assert {"torch", "torch-compiled", "onnxruntime", "openvino", "tensorrt"} <= set(found)
    assert found["onnxruntime"].options_type is OnnxRuntimeOptions
    assert "echo" not in found


def test_a_registered_plugin_is_offered_by_serve_with_its_flags(echo, capsys):
    text = serve_help(capsys)
    choices = text.split("--backend {", 1)[1].split("}", 1)[0].split(",")
    assert "echo" in choices and "torch" in choices
    assert "echo backend:" in text and "--echo-gain ECHO_GAIN" in text
    assert "echo: returns its inputs (a test backend)" in " ".join(text.split())


def test_create_backend_builds_it_with_its_options_from_the_flags(echo, tmp_path):
    args = build_parser("serve").parse_args(["serve", "--backend", "echo", "--echo-gain", "3"])
    settings = backend_settings_from_args(args)
    backend = create_backend("echo", tmp_path, settings)
    assert isinstance(backend, EchoBackend) and backend.model_dir == tmp_path
    assert backend.options == EchoOptions(gain=3.0)
    assert torch.equal(backend.unet(torch.ones(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 77, 8)),
                       torch.full((2, 4, 8, 8), 3.0))
    warm_up(backend)
    assert backend.warmed
    # No options: the plug-in's defaults, which are also its flags' defaults.
    assert create_backend("echo", tmp_path, BackendSettings()).options == EchoOptions()
    with pytest.raises(InvalidArgument, match="the echo backend takes EchoOptions, not a OnnxRuntimeOptions"):
        create_backend("echo", tmp_path, BackendSettings(options=OnnxRuntimeOptions()))


def test_an_unknown_backend_names_the_available_ones(tmp_path):
    with pytest.raises(NotFound, match="backend 'directml' is not available; choose one of: .*onnxruntime.*torch"):
        create_backend("directml", tmp_path, BackendSettings())


def test_a_plugin_whose_flags_clash_is_not_offered(capsys, caplog):
    clash = BackendPlugin(name="clash", description="takes --device for itself", load=EchoBackend,
                          add_arguments=lambda group: group.add_argument("--device"))
    register(clash)
    try:
        with caplog.at_level(logging.ERROR):
            text = serve_help(capsys)
    finally:
        unregister("clash")
    assert "clash" not in text.split("--backend {", 1)[1].split("}", 1)[0]
    assert "the clash backend is not offered: its flags clash" in caplog.text


def test_a_new_file_in_the_package_is_a_backend_and_a_broken_one_is_skipped(tmp_path, monkeypatch, caplog):
    """What adding e.g. backends/openvino.py does: the registry finds it; a module that fails to import is
    logged and left out, and the others are still offered."""
    (tmp_path / "zz_echo.py").write_text(textwrap.dedent("""
        from diffusiond.backends.base import BackendPlugin

        PLUGIN = BackendPlugin(name="zz-echo", description="found by looking", load=lambda model_dir, settings: None)
    """))
    (tmp_path / "zz_broken.py").write_text("import a_runtime_that_is_not_installed\n")
    monkeypatch.setattr(diffusiond.backends, "__path__", [*diffusiond.backends.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", None)  # look again
    try:
        with caplog.at_level(logging.WARNING):
            found = plugins()
    finally:
        for name in ("zz_echo", "zz_broken"):
            sys.modules.pop(f"diffusiond.backends.{name}", None)
    assert found["zz-echo"].description == "found by looking"
    assert {"torch", "torch-compiled", "onnxruntime", "openvino", "tensorrt"} <= set(found)
    assert "diffusiond.backends.zz_broken could not be imported" in caplog.text
    assert "a_runtime_that_is_not_installed" in caplog.text
