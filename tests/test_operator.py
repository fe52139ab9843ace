"""What operators expect of the command line: DIFFUSIOND_* variables for every serve flag, JSON logs,
--version, a client that rides out a loading server, quiet starts and exports, progress fit for a
terminal or a log, the output format from -o, and a clear word on a client-only install."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import http_client as web
import pytest
from PIL import Image
from test_client_import import run_python

from diffusiond import __version__
from diffusiond.cli import build_parser, main
from diffusiond.client import ClientError, DiffusionClient
from diffusiond.client.progress import Progress
from diffusiond.envflags import EnvironmentDefaults, variable_for
from diffusiond.errors import Unavailable
from diffusiond.server.logs import JsonFormatter

WAIT_S = 120.0


def parse_serve(argv: list[str]):
    args = build_parser("serve").parse_args(["serve", *argv])
    return args.finish(args)


# -- every serve flag from the environment -----------------------------------------------------


def test_every_serve_flag_has_a_variable():
    serve = build_parser("serve")._subparsers._group_actions[0].choices["serve"]
    flags = {next(o for o in a.option_strings if o.startswith("--")): a for a in serve._actions
             if a.option_strings and a.dest != "help"}
    assert "--http-port" in flags and "--providers" in flags  # backend plug-ins' flags too
    for option, action in flags.items():
        assert action.help.endswith(f"[env {variable_for(option)}]"), option
    assert variable_for("--max-batch-size") == "DIFFUSIOND_MAX_BATCH_SIZE"
    assert variable_for("--auth-tokens") == "DIFFUSIOND_AUTH_TOKENS_FILE"  # DIFFUSIOND_AUTH_TOKENS holds tokens


def test_variables_set_flags_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("DIFFUSIOND_PORT", "6001")
    monkeypatch.setenv("DIFFUSIOND_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("DIFFUSIOND_NO_WARMUP", "yes")
    monkeypatch.setenv("DIFFUSIOND_DTYPE", "bf16")
    monkeypatch.setenv("DIFFUSIOND_MODEL", "a=/models/a, b=/models/b")
    monkeypatch.setenv("DIFFUSIOND_HTTP_PORT", "8080")
    args = parse_serve([])
    assert (args.port, args.max_batch_size, args.no_warmup, args.dtype) == (6001, 4, True, "bf16")
    assert args.model == ["a=/models/a", "b=/models/b"] and args.http_port == 8080
    args = parse_serve(["--port", "7000", "--model", "c=/models/c", "--dtype", "fp32"])
    assert (args.port, args.model, args.dtype) == (7000, ["c=/models/c"], "fp32")
    monkeypatch.setenv("DIFFUSIOND_NO_WARMUP", "0")
    assert parse_serve([]).no_warmup is False


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [("DIFFUSIOND_MAX_QUEUE", "many", "invalid literal"), ("DIFFUSIOND_DTYPE", "fp64", "choose from"),
     ("DIFFUSIOND_NO_WARMUP", "maybe", "expected 1, true")],
)
def test_a_bad_variable_is_an_error_naming_it(monkeypatch, capsys, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        parse_serve([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"environment variable {name}={value!r}" in err and fragment in err


def test_environment_defaults_apply_to_any_parser():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--tag", action="append")
    finish = EnvironmentDefaults(parser, {"DIFFUSIOND_RATE": "2.5", "DIFFUSIOND_TAG": "x,y"}).finish
    assert vars(finish(parser.parse_args([]))) == {"rate": 2.5, "tag": ["x", "y"]}


# -- --version, JSON logs, a quiet start, the gateway from the environment -----------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"diffusiond {__version__}"


def test_json_log_lines_are_one_object_each():
    formatter = JsonFormatter()
    record = logging.makeLogRecord({"name": "diffusiond.x", "levelname": "INFO", "levelno": logging.INFO,
                                    "msg": "req=%s accepted: %s", "args": ("abc-1", "two\nlines\x1b[31m ü")})
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "abc-1" and entry["message"].endswith("two\nlines\x1b[31m ü")
    assert entry["level"] == "INFO" and entry["logger"] == "diffusiond.x" and entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys as sys_

        record = logging.makeLogRecord({"msg": "failed", "levelno": logging.ERROR, "exc_info": sys_.exc_info()})
    assert "ValueError: boom" in json.loads(formatter.format(record))["exception"]


def test_serve_from_the_environment_logs_json_and_nothing_else(builtin_dir, tmp_path):
    """The real command, configured only by variables: every stderr line is one of our JSON records
    (no third-party warning at start), and the HTTP gateway answers on the port it logged."""
    env = {**os.environ, "DIFFUSIOND_CACHE": str(tmp_path / "cache"), "DIFFUSIOND_PORT": "0",
           "DIFFUSIOND_HTTP_PORT": "0", "DIFFUSIOND_LOG_FORMAT": "json", "DIFFUSIOND_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusiond.cli", "serve"], stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: list[str] = []
    try:
        http_port = None
        for line in proc.stderr:
            lines.append(line)
            if match := re.search(r"HTTP gateway and web page on http://127\.0\.0\.1:(\d+)/", line):
                http_port = int(match.group(1))
            if "serving builtin" in line:
                break
        assert http_port, "".join(lines)
        assert web.get(f"http://127.0.0.1:{http_port}/readyz").status == 200
        proc.send_signal(signal.SIGINT)
        lines.extend(proc.stderr.read().splitlines(keepends=True))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = [json.loads(line) for line in lines]  # fails on any line that is not one of ours
    assert all(entry["logger"].startswith("diffusiond") for entry in entries), entries
    assert any(entry["message"] == "stopped" for entry in entries)


# -- the client rides out a loading server -------------------------------------------------------


def test_client_retries_unavailable_while_the_server_loads(server, monkeypatch):
    service = server.server.service
    refused = threading.Event()
    accepting = service.check_accepting

    def loading_once() -> None:
        if not refused.is_set():
            refused.set()
            raise Unavailable("the server is still loading its models; retry shortly")
        accepting()

    monkeypatch.setattr(service, "check_accepting", loading_once)
    with DiffusionClient(server.address, timeout=WAIT_S) as client:
        assert client.generate("a fox", steps=1, seed=1).images
    assert refused.is_set()

    refused.clear()
    with DiffusionClient(server.address, timeout=WAIT_S, max_attempts=1) as client:
        with pytest.raises(ClientError) as error:
            client.generate("a fox", steps=1, seed=1)
    assert error.value.code is grpc.StatusCode.UNAVAILABLE


def test_wait_for_ready_waits_for_a_server_that_is_not_listening_yet(builtin_dir):
    import socket

    from diffusiond.models.sources import ModelSource
    from diffusiond.server.app import ServerSettings, ServerThread

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results: list[object] = []
    # One attempt: without wait_for_ready the call would fail at once with UNAVAILABLE.
    client = DiffusionClient(f"127.0.0.1:{port}", timeout=WAIT_S, wait_for_ready=True, max_attempts=1)
    caller = threading.Thread(target=lambda: results.append(client.list_models()))
    caller.start()
    thread = ServerThread(ServerSettings(port=port, models=[ModelSource("builtin", str(builtin_dir))]))
    thread.start(load=False)
    try:
        caller.join(WAIT_S)
        assert results == [[]]  # answered (no model is loaded yet)
    finally:
        client.close()
        thread.stop()


# -- progress, output formats ----------------------------------------------------------------------


def test_progress_is_plain_lines_off_a_terminal():
    out = io.StringIO()
    bar = Progress("steps", out)
    for step in range(1, 21):
        bar.update(step, 20, eta_s=(20 - step) * 0.1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "1/20 steps (5%), ETA 1.9s" and lines[-1] == "20/20 steps (100%), ETA 0.0s"
    assert len(lines) == 11  # the first step, then every tenth of the way


def test_progress_is_a_tqdm_bar_on_a_terminal():
    out = io.StringIO()
    bar = Progress("steps", out, tty=True)
    for step in range(1, 6):
        bar.update(step, 5, eta_s=1.0)
    bar.note("started")
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "5/5" in text and "ETA 1.0s" in text and "started" in text


def test_generate_stream_reports_progress_as_lines(server, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", "a fox", "--steps", "10", "--seed", "3", "--stream", "--server", server.address,
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "10/10 steps (100%)" in err and "\r" not in err


@pytest.mark.parametrize(
    ("name", "flags", "written", "image_format"),
    [("x.webp", [], "x.webp", "WEBP"), ("x.jpeg", [], "x.jpeg", "JPEG"), ("x", ["--format", "jpeg"], "x.jpg", "JPEG"),
     ("x", [], "x.png", "PNG"), ("x.webp", ["--format", "webp"], "x.webp", "WEBP")],
)
def test_the_output_format_follows_the_extension(server, tmp_path, capsys, name, flags, written, image_format):
    assert main(["generate", "a fox", "--steps", "1", "--server", server.address, "-o", str(tmp_path / name),
                 *flags]) == 0
    assert Image.open(tmp_path / written).format == image_format
    assert [p.name for p in tmp_path.iterdir()] == [written]


@pytest.mark.parametrize(
    ("name", "flags", "fragment"),
    [("x.webp", ["--format", "png"], "--format png does not match"), ("x.gif", [], ".gif is not a format")],
)
def test_a_clash_between_format_and_extension_is_an_error(server, tmp_path, capsys, name, flags, fragment):
    assert main(["generate", "a fox", "--steps", "1", "--server", server.address, "-o", str(tmp_path / name),
                 *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- a client-only install ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "extra"),
    [(["serve"], "server"), (["eval"], "server"), (["export", "onnx", "--model", "m", "--out", "o"], "server,onnx"),
     (["serve", "--http-port", "0"], "server")],
)
def test_server_commands_on_a_client_only_install_name_the_extra(argv, extra):
    proc = run_python(f"from diffusiond.cli import main\nraise SystemExit(main({argv!r}))")
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'diffusiond[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr


# -- quiet exports ------------------------------------------------------------------------------------


def test_export_tools_chatter_goes_to_the_debug_log(caplog, capsys):
    from diffusiond.export.quiet import quiet_tools

    caplog.set_level(logging.INFO)
    with quiet_tools("quantizer"):
        logging.getLogger("onnxruntime.transformers.float16").info("initializer is used by both: [node { ... }]")
        logging.root.handle(logging.makeLogRecord({
            "name": "root", "levelno": logging.WARNING, "levelname": "WARNING", "msg": "Please consider pre-processing",
            "pathname": "/venv/site-packages/onnxruntime/quantization/quantize.py",
        }))
        print("Collecting tensor data and making histogram ...")
        logging.getLogger("diffusiond.export").info("our own stage")
    assert [r.getMessage() for r in caplog.records] == ["our own stage"]
    assert capsys.readouterr().out == ""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="diffusiond.export")
    with quiet_tools("quantizer"):
        print("Collecting tensor data")
    assert [r.getMessage() for r in caplog.records] == ["quantizer: Collecting tensor data"]
    logging.root.handle(logging.makeLogRecord({"name": "root", "levelno": logging.WARNING, "msg": "after"}))
    assert caplog.records[-1].getMessage() == "after"  # the filter is gone afterwards
