"""`diffusiond serve` as a real process: starts on the built-in model, Ctrl-C stops it cleanly,
SIGTERM drains it: every accepted request completes, new ones are refused, exit code 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffusiond.client import ClientError, DiffusionClient


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


class ServerProcess:
    """`diffusiond serve` in a subprocess; its log lines are collected as they come."""

    def __init__(self, builtin_dir, *args: str) -> None:
        env = {**os.environ, "DIFFUSIOND_CACHE": str(builtin_dir.parent.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diffusiond.cli", "serve", "--port", "0", "--threads", "1", *args],
            stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        port = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.wait_for(r"serving builtin")
        self.address = f"127.0.0.1:{int(port.group(1))}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        with self._new_line:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := re.search(pattern, line):
                        return match
                seen = len(self.lines)
                if self.proc.poll() is not None and seen == len(self.lines):
                    raise AssertionError(f"server exited before logging {pattern!r}:\n{''.join(self.lines)}")
                assert self._new_line.wait(timeout), f"no {pattern!r} in:\n{''.join(self.lines)}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def test_sigterm_finishes_every_accepted_request(builtin_dir):
    server = ServerProcess(builtin_dir, "--max-batch-size", "2", "--grace-period", "120")
    try:
        accepted = threading.Barrier(5)
        results: list[object] = [None] * 4

        def stream(i: int) -> None:
            try:
                with DiffusionClient(server.address, timeout=120) as client:
                    events = iter(client.stream(f"request {i}", seed=i, steps=30, scheduler="ddim"))
                    assert next(events).WhichOneof("event") == "queued"  # accepted
                    accepted.wait(60)
                    results[i] = [e for e in events if e.WhichOneof("event") == "result"]
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        accepted.wait(60)  # all four accepted: some running, the rest queued
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("shutting down")
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with DiffusionClient(server.address, timeout=30, max_attempts=1) as client:  # its own answer, not a retry's
            with pytest.raises(ClientError) as refused:
                client.generate("too late", seed=9, steps=2)
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details
        for t in threads:
            t.join(120)
        for result in results:
            assert isinstance(result, list) and len(result) == 1 and result[0].result.images, result
        assert server.proc.wait(timeout=60) == 0, "".join(server.lines)
        log = "".join(server.lines)
        assert "received SIGTERM" in log and "stopped" in log and "Traceback" not in log
    finally:
        server.kill()


def test_sighup_rereads_the_auth_tokens(builtin_dir, tmp_path):
    first, second = "first-token-0123456789", "second-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{first}\n")
    server = ServerProcess(builtin_dir, "--auth-tokens", str(tokens), "--no-warmup")
    try:
        with DiffusionClient(server.address, timeout=60, token=first) as client:
            assert client.list_models()
        stat = tokens.stat()
        tokens.write_text(f"ops:{second}\n")
        os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # unchanged mtime: only the signal tells
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for("auth tokens reloaded")
        with DiffusionClient(server.address, timeout=60, token=second) as client:
            assert client.list_models()
        with DiffusionClient(server.address, timeout=60, token=first) as client:
            with pytest.raises(ClientError) as refused:
                client.list_models()
        assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
        log = "".join(server.lines)
        assert first not in log and second not in log
    finally:
        server.kill()
