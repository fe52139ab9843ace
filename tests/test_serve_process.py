"""`diffusiond serve` as a real process: starts on the built-in model, Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffusiond.client import DiffusionClient


def test_serve_generate_and_ctrl_c(builtin_dir, tmp_path):
    env = {**os.environ, "DIFFUSIOND_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffusiond.cli", "serve", "--port", "0", "--threads", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        port = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
            if "serving builtin" in line:
                break
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with DiffusionClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert client.generate("a fox", steps=2, seed=1).images[0].data.startswith(b"\x89PNG")
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, rest
        assert "received SIGINT" in rest and "stopped" in rest
        assert "Traceback" not in "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
