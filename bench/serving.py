"""Serving benchmark: dynamic batching on and off, at several concurrencies, through real gRPC clients.

One command:

    .venv/bin/python bench/serving.py

starts two `diffusiond serve` processes on the same model (one with
``--max-batch-size 1``, one batching), then, for each concurrency, drives
each server in turn with that many client threads (one gRPC channel each,
closed loop: a client sends its next request when the last one returns) and
reports images/s, p50 and p99 latency, and the mean batch the server formed
(from its /metrics). The two servers are measured alternately within one run,
rounds in ABBA order, so machine load drifts affect both alike; compare the
ratios, not the absolute figures, across runs.

The model defaults to the ``small`` synthetic preset (see
``diffusiond/models/synthetic.py``), created on first use in the cache.
Every request has its own prompt and seed (no cache hits), guidance on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusiond.client import DiffusionClient  # noqa: E402


@dataclass
class Measurement:
    mode: str
    concurrency: int
    requests: int
    images: int
    wall_s: float
    latencies_s: list[float]
    batches: float  # batches the server formed during the measurement
    batched_requests: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile."""
        ordered = sorted(self.latencies_s)
        rank = max(1, int(-(-q * len(ordered) // 100)))
        return ordered[rank - 1]

    @property
    def mean_batch(self) -> float:
        return self.batched_requests / self.batches if self.batches else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, model_dir: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str, int, str]:
    metrics_port = free_port()
    command = [
        sys.executable, "-m", "diffusiond.cli", "serve", "--port", "0", "--model", f"bench={model_dir}",
        "--threads", str(threads), "--metrics-port", str(metrics_port), "--max-queue", "256", *extra,
    ]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    port = None
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := re.search(r"listening on [\d.]+:(\d+)", line):
            port = int(match.group(1))
        if "serving bench" in line:
            break
    if port is None:
        raise RuntimeError(f"the {name} server did not start: {proc.poll()}")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    return proc, f"127.0.0.1:{port}", metrics_port, "diffusiond " + " ".join(command[3:])


def scrape(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("diffusiond_batch_size_count", "diffusiond_batch_size_sum")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


def drive(address: str, concurrency: int, total: int, first_index: int, fields: dict) -> tuple[float, list[float]]:
    """``total`` requests from ``concurrency`` closed-loop clients; return wall time and latencies."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_index = [first_index]

    def client() -> None:
        with DiffusionClient(address, timeout=3600) as c:
            c.wait_ready()
            while True:
                with lock:
                    index = next_index[0]
                    if index >= first_index + total:
                        return
                    next_index[0] += 1
                started = time.perf_counter()
                try:
                    c.generate(f"benchmark prompt number {index}, a red fox in the snow", seed=index, **fields)
                except Exception as exc:
                    errors.append(exc)
                    return
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]}")
    return wall, latencies


def paired_latencies(addresses: dict[str, str], total: int, first_index: int, fields: dict) -> dict[str, list[float]]:
    """One client, requests sent to each server in turn: load drift hits both sides of every pair alike."""
    latencies: dict[str, list[float]] = {mode: [] for mode in addresses}
    clients = {mode: DiffusionClient(address, timeout=3600) for mode, address in addresses.items()}
    try:
        for i in range(total):
            order = list(addresses) if i % 2 == 0 else list(addresses)[::-1]
            for mode in order:
                started = time.perf_counter()
                clients[mode].generate(f"benchmark prompt number {first_index + i}, a red fox in the snow",
                                       seed=first_index + i, **fields)
                latencies[mode].append(time.perf_counter() - started)
    finally:
        for c in clients.values():
            c.close()
    return latencies


def ensure_model(path: Path, preset: str) -> Path:
    if not (path / "model_index.json").is_file():
        print(f"creating the {preset} model in {path}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "diffusiond.cli", "create-model", "--preset", preset, "--out", str(path)],
            check=True, cwd=REPO,
        )
    return path


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the small preset)")
    parser.add_argument("--preset", default="small", help="synthetic preset created when --model is absent")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=4, help="measured requests per client")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many measured requests")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=2, help="server inference threads")
    parser.add_argument("--rounds", type=int, default=2, help="measurement rounds, alternating the order (ABBA)")
    parser.add_argument("--paired-requests", type=int, default=16,
                        help="requests per server for the paired latency check at concurrency 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.model is None:
        cache = Path(os.environ.get("DIFFUSIOND_CACHE", Path.home() / ".cache" / "diffusiond"))
        args.model = cache / "models" / f"{args.preset}-bench"
    model_dir = ensure_model(args.model, args.preset)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    fields = dict(steps=args.steps, scheduler=args.scheduler)
    before = machine()

    modes = {
        "off": ["--max-batch-size", "1", "--max-batch-delay-ms", "0"],
        "on": ["--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms)],
    }
    servers = {}
    try:
        for mode, extra in modes.items():
            servers[mode] = start_server(mode, model_dir, args.threads, extra)
        results: dict[tuple[str, int], Measurement] = {}
        index = 0
        for c in concurrencies:
            total = max(args.min_requests, c * args.requests_per_client)
            order = ["off", "on"]
            for round_ in range(args.rounds):
                for mode in order if round_ % 2 == 0 else order[::-1]:
                    _, address, metrics_port, _ = servers[mode]
                    drive(address, c, c, index, fields)  # warm-up: this batch size's kernels, channels
                    index += c
                    m0 = scrape(metrics_port)
                    wall, latencies = drive(address, c, total, index, fields)
                    index += total
                    m1 = scrape(metrics_port)
                    key = (mode, c)
                    prev = results.get(key)
                    batches = m1.get("diffusiond_batch_size_count", 0) - m0.get("diffusiond_batch_size_count", 0)
                    batched = m1.get("diffusiond_batch_size_sum", 0) - m0.get("diffusiond_batch_size_sum", 0)
                    if prev is None:
                        results[key] = Measurement(mode, c, total, total, wall, latencies, batches, batched)
                    else:
                        prev.requests += total
                        prev.images += total
                        prev.wall_s += wall
                        prev.latencies_s += latencies
                        prev.batches += batches
                        prev.batched_requests += batched
                    print(f"  c={c:<3} batching {mode:<3} round {round_ + 1}: {total / wall:6.2f} images/s", file=sys.stderr)
        paired: dict[str, list[float]] = {}
        if 1 in concurrencies:
            addresses = {mode: servers[mode][1] for mode in ("off", "on")}
            paired = paired_latencies(addresses, args.paired_requests, index, fields)
    finally:
        for proc, *_ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, *_ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    after = machine()
    lines = [
        f"model: {model_dir.name} ({args.preset} preset)" if args.model.name.endswith("-bench") else f"model: {model_dir}",
        f"requests: {args.steps} steps ({args.scheduler}), guidance 7.5, native size, 1 image, own prompt and seed",
        f"servers: `{servers['off'][3]}` vs `{servers['on'][3]}`",
        f"machine: {before['cpu']}, {before['cores']} cores; Python {before['python']}, torch {before['torch']}",
        f"load average before: {before['loadavg']}; after: {after['loadavg']}",
        "",
        "| concurrency | batching | requests | images/s | p50 s | p99 s | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in concurrencies:
        for mode in ("off", "on"):
            m = results[(mode, c)]
            lines.append(
                f"| {c} | {mode} | {m.requests} | {m.images_per_s:.2f} | {m.percentile(50):.2f} | "
                f"{m.percentile(99):.2f} | {m.mean_batch:.1f} |"
            )
    if paired:
        lines += [
            "",
            f"Paired latency at concurrency 1 ({args.paired_requests} requests to each server, alternating):",
            "",
            "| batching | p50 s | mean s |",
            "|---|---|---|",
        ]
        for mode in ("off", "on"):
            lines.append(f"| {mode} | {statistics.median(paired[mode]):.3f} | {statistics.fmean(paired[mode]):.3f} |")
        added = [on - off for on, off in zip(paired["on"], paired["off"])]
        lines.append("")
        lines.append(
            f"- concurrency 1, paired: batching adds {statistics.median(added):+.3f} s to the median request "
            f"(median of per-pair differences; batch delay {args.max_batch_delay_ms / 1000:.3f} s)"
        )
    lines.append("")
    for c in concurrencies:
        off, on = results[("off", c)], results[("on", c)]
        lines.append(
            f"- concurrency {c}: batching gives {on.images_per_s / off.images_per_s:.2f}x the throughput; "
            f"p50 {on.percentile(50) - off.percentile(50):+.3f} s (batch delay {args.max_batch_delay_ms / 1000:.3f} s)"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "machine_before": before, "machine_after": after, "args": {k: str(v) for k, v in vars(args).items()},
            "results": [{**asdict(m), "images_per_s": m.images_per_s, "p50_s": m.percentile(50),
                         "p99_s": m.percentile(99), "mean_batch": m.mean_batch} for m in results.values()],
            "paired_c1_latencies_s": paired,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
