"""Serving benchmark through real gRPC clients: open-loop Poisson arrivals (default) or closed loop.

Open loop (the default; ``bench/serving.py [open] ...``):

    .venv/bin/python bench/serving.py              # about 15-20 minutes on 2 CPU cores
    .venv/bin/python bench/serving.py --quick      # a smoke run of a few minutes
    .venv/bin/python bench/serving.py --json results.json

starts three ``diffusiond serve`` processes on the same model: ``unbatched``
(``--max-batch-size 1``), ``static`` (``--batching static``, batches of up
to N images with a batch delay) and ``continuous`` (``--batching
continuous``, up to N images, no delay). It measures the static server's
capacity first (requests/s for a burst of requests all sent at once), then
at three arrival rates derived from it (low, about 70 %, and an overload
above every server's capacity) sends each server in turn the *same* seeded
workload: Poisson arrival times, and requests with steps drawn uniformly from
10 to 30, a scheduler drawn from a mixed set, their own prompt and seed,
guidance on. Each request is sent at its scheduled time whatever is still
outstanding (an asyncio client, one ``StreamProgress`` call per request), so
that a slow server builds a queue instead of slowing the arrivals.

Per rate and server it reports throughput (completed requests / the wall
time from the first send to the last result; one image per request, so
images/s is the same figure), P50/P99 latency (send to result), P50/P99 time
to first step (TTFS: send to the first ``step`` event), the mean time of one
denoising step as the server saw it under that load (the mean interval
between a request's consecutive step events, from their ``elapsed_s``,
weighted by steps: it includes the other requests' prompt encodings and
decodes that the worker interleaves between steps), and the mean number of
requests per UNet call (from ``diffusiond_batch_size`` in /metrics, observed
at every denoising step). Then it checks the targets: at the ~70 % rate,
continuous P99 latency <= 0.7x static and continuous TTFS P50 <= 1.5 of its
step times; continuous throughput >= static at every rate.

Percentiles are nearest-rank: P99 of fewer than 100 requests is the largest.

Closed loop (``bench/serving.py closed ...``, the earlier benchmark): two
servers, batching off and on, driven by N closed-loop clients at several
concurrencies with identical requests (10 DDIM steps).

The model defaults to the ``small`` synthetic preset (see
``diffusiond/models/synthetic.py``), created on first use in the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusiond.client import AsyncDiffusionClient, ClientError, DiffusionClient  # noqa: E402

SCHEDULERS = "ddim,euler,euler_a,dpmpp_2m,unipc"
MODES = ("unbatched", "static", "continuous")


# -- shared: servers, metrics, machine ----------------------------------------------------------


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


def stop_servers(servers: dict) -> None:
    for proc, *_ in servers.values():
        proc.send_signal(signal.SIGTERM)
    for proc, *_ in servers.values():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def scrape(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("diffusiond_batch_size_count", "diffusiond_batch_size_sum")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


def ensure_model(path: Path, preset: str) -> Path:
    if not (path / "model_index.json").is_file():
        print(f"creating the {preset} model in {path}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "diffusiond.cli", "create-model", "--preset", preset, "--out", str(path)],
            check=True, cwd=REPO,
        )
    return path


def default_model_dir(preset: str) -> Path:
    cache = Path(os.environ.get("DIFFUSIOND_CACHE", Path.home() / ".cache" / "diffusiond"))
    return cache / "models" / f"{preset}-bench"


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
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def nearest_rank(values: list[float], q: float) -> float:
    """Nearest-rank percentile (P99 of fewer than 100 values is the largest); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[rank - 1]


# -- open loop ----------------------------------------------------------------------------------


@dataclass
class Job:
    """One request of a workload: when it is sent (seconds after the run starts) and what it asks."""

    index: int
    arrival_s: float
    steps: int
    scheduler: str
    seed: int
    prompt: str


@dataclass
class Outcome:
    index: int
    steps: int
    scheduler: str
    scheduled_s: float  # when it should have been sent, from the run's start
    sent_s: float  # when it was sent, from the run's start
    first_step_s: float | None = None
    result_s: float | None = None
    step_span_s: float = 0.0  # server-side elapsed_s from the first step event to the last one
    step_intervals: int = 0  # steps in that span
    error: str | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.result_s is None else self.result_s - self.sent_s

    @property
    def ttfs_s(self) -> float | None:
        return None if self.first_step_s is None else self.first_step_s - self.sent_s


def make_workload(
    label: str, seed: int, count: int, rate: float | None, steps: tuple[int, int], schedulers: list[str]
) -> list[Job]:
    """``count`` requests with Poisson arrivals at ``rate`` per second (None: all at once).

    The draws depend on ``label`` and ``seed`` only, not on the rate: the gaps are
    unit-rate exponentials scaled by 1 / rate, so runs with another measured
    capacity send the same requests in the same order, only faster or slower.
    """
    rng = random.Random(f"diffusiond-serving-bench/{seed}/{label}")
    jobs, clock = [], 0.0
    for i in range(count):
        gap = rng.expovariate(1.0)
        if i and rate is not None:
            clock += gap / rate
        jobs.append(Job(
            index=i,
            arrival_s=clock,
            steps=rng.randint(*steps),
            scheduler=rng.choice(schedulers),
            seed=rng.randrange(2**31),
            prompt=f"{label} request {i}: a red fox in the snow, seen from afar, watercolour {rng.randrange(10**6)}",
        ))
    return jobs


async def _run_jobs(address: str, jobs: list[Job], fields: dict, timeout: float) -> list[Outcome]:
    async with AsyncDiffusionClient(address, timeout=timeout) as client:
        await client.list_models()  # connected before the clock starts
        start = time.perf_counter() + 0.1

        async def one(job: Job) -> Outcome:
            delay = start + job.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            out = Outcome(job.index, job.steps, job.scheduler, job.arrival_s, sent - start)
            first_elapsed = last_elapsed = 0.0
            first_step = last_step = 0
            try:
                async for event in client.stream(
                    job.prompt, steps=job.steps, scheduler=job.scheduler, seed=job.seed,
                    request_id=f"bench-{job.index}", **fields,
                ):
                    now = time.perf_counter() - start
                    kind = event.WhichOneof("event")
                    if kind == "step":
                        if out.first_step_s is None:
                            out.first_step_s = now
                            first_elapsed, first_step = event.step.elapsed_s, event.step.step
                        last_elapsed, last_step = event.step.elapsed_s, event.step.step
                    elif kind == "result":
                        out.result_s = now
            except ClientError as exc:
                out.error = str(exc)
            if out.result_s is None and out.error is None:
                out.error = "the stream ended without a result"
            out.step_span_s = last_elapsed - first_elapsed
            out.step_intervals = last_step - first_step
            return out

        return list(await asyncio.gather(*(one(job) for job in jobs)))


def run_jobs(address: str, jobs: list[Job], fields: dict, timeout: float = 3600.0) -> list[Outcome]:
    return asyncio.run(_run_jobs(address, jobs, fields, timeout))


@dataclass
class Run:
    """One server under one workload."""

    rate_name: str
    mode: str
    offered_rps: float | None  # None: all at once
    outcomes: list[Outcome]
    unet_calls: float
    batched_requests: float
    load_before: str
    load_after: str
    summary: dict = field(default_factory=dict)

    def summarise(self) -> dict:
        ok = [o for o in self.outcomes if o.error is None]
        latencies = [o.latency_s for o in ok]
        ttfs = [o.ttfs_s for o in ok if o.ttfs_s is not None]
        first_send = min(o.sent_s for o in self.outcomes)
        last_result = max((o.result_s for o in ok), default=first_send)
        wall = last_result - first_send
        intervals = sum(o.step_intervals for o in ok)
        self.summary = {
            "completed": len(ok),
            "failed": len(self.outcomes) - len(ok),
            "wall_s": wall,
            "throughput_rps": len(ok) / wall if wall > 0 else float("nan"),
            "images_per_s": len(ok) / wall if wall > 0 else float("nan"),  # one image per request
            "latency_p50_s": nearest_rank(latencies, 50),
            "latency_p99_s": nearest_rank(latencies, 99),
            "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
            "ttfs_p50_s": nearest_rank(ttfs, 50),
            "ttfs_p99_s": nearest_rank(ttfs, 99),
            "step_time_s": sum(o.step_span_s for o in ok) / intervals if intervals else float("nan"),
            "requests_per_unet_call": self.batched_requests / self.unet_calls if self.unet_calls else float("nan"),
            "max_send_lag_s": max(o.sent_s - o.scheduled_s for o in self.outcomes),
        }
        return self.summary


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else ""


def measure(rate_name: str, mode: str, server: tuple, jobs: list[Job], fields: dict, rate: float | None) -> Run:
    _, address, metrics_port, _ = server
    before_load = loadavg()
    m0 = scrape(metrics_port)
    outcomes = run_jobs(address, jobs, fields)
    m1 = scrape(metrics_port)
    run = Run(
        rate_name, mode, rate, outcomes,
        unet_calls=m1.get("diffusiond_batch_size_count", 0) - m0.get("diffusiond_batch_size_count", 0),
        batched_requests=m1.get("diffusiond_batch_size_sum", 0) - m0.get("diffusiond_batch_size_sum", 0),
        load_before=before_load, load_after=loadavg(),
    )
    s = run.summarise()
    print(
        f"  {rate_name:<10} {mode:<10} {s['completed']}/{len(jobs)} done in {s['wall_s']:6.1f} s: "
        f"{s['throughput_rps']:.3f} req/s, P50 {s['latency_p50_s']:.2f} s, P99 {s['latency_p99_s']:.2f} s, "
        f"TTFS P50 {s['ttfs_p50_s']:.2f} s, step {s['step_time_s']:.3f} s, "
        f"{s['requests_per_unet_call']:.2f} req/call (load {run.load_after.split(' ')[0]})",
        file=sys.stderr, flush=True,
    )
    if s["failed"]:
        first = next(o.error for o in outcomes if o.error)
        print(f"    {s['failed']} failed; first: {first}", file=sys.stderr)
    return run


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def open_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/serving.py [open]", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the small preset)")
    parser.add_argument("--preset", default="small", help="synthetic preset created when --model is absent")
    parser.add_argument("--size", type=int, default=128, help="image width and height (0: the model's own)")
    parser.add_argument("--threads", type=int, default=2, help="server inference threads")
    parser.add_argument("--max-batch-size", type=int, default=8, help="N for the static and continuous servers")
    parser.add_argument("--static-delay-ms", type=float, default=50.0, help="static server's --max-batch-delay-ms")
    parser.add_argument("--continuous-delay-ms", type=float, default=0.0,
                        help="continuous server's --max-batch-delay-ms")
    parser.add_argument("--steps", default="10,30", help="steps are drawn uniformly from MIN,MAX (inclusive)")
    parser.add_argument("--schedulers", default=SCHEDULERS, help="schedulers drawn uniformly (comma-separated)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--capacity", type=float, default=None,
                        help="static capacity in requests/s; skips its measurement (for repeatable rates)")
    parser.add_argument("--capacity-requests", type=int, default=12,
                        help="requests sent at once to the static server to measure its capacity")
    parser.add_argument("--rates", default="0.25,0.7,2.0",
                        help="low, ~70 %% and overload arrival rates as fractions of the static capacity")
    parser.add_argument("--requests", default="8,30,24", help="requests per server at each of the three rates")
    parser.add_argument("--warmup", type=int, default=4,
                        help="requests (10 steps, all at once) sent to each server before measuring")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: steps 10-12, 3 capacity requests, 2,3,4 requests per rate, 1 warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and request here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.capacity_requests, args.requests, args.warmup = "10,12", 3, "2,3,4", 1

    steps = tuple(int(s) for s in args.steps.split(","))
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    fractions = [float(f) for f in args.rates.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    if len(steps) != 2 or len(fractions) != 3 or len(counts) != 3:
        parser.error("--steps takes MIN,MAX; --rates and --requests take three values each")
    rate_names = ["low", "70%", "overload"]
    preset_model = args.model is None
    model_dir = ensure_model(args.model or default_model_dir(args.preset), args.preset)
    fields = {"guidance_scale": args.guidance, "width": args.size, "height": args.size}
    n = args.max_batch_size
    flags = {
        "unbatched": ["--max-batch-size", "1", "--max-batch-delay-ms", "0"],
        "static": ["--max-batch-size", str(n), "--batching", "static",
                   "--max-batch-delay-ms", f"{args.static_delay_ms:g}"],
        "continuous": ["--max-batch-size", str(n), "--batching", "continuous",
                       "--max-batch-delay-ms", f"{args.continuous_delay_ms:g}"],
    }
    before = machine()
    started = time.perf_counter()
    servers: dict = {}
    runs: list[Run] = []
    capacity_run: Run | None = None
    try:
        for mode in MODES:
            servers[mode] = start_server(mode, model_dir, args.threads, flags[mode])
        print(f"servers up ({time.perf_counter() - started:.0f} s); load {loadavg()}", file=sys.stderr, flush=True)
        for mode in MODES:  # kernels for several batch sizes, channels; not measured
            if args.warmup:
                warm = make_workload("warm-up", args.seed, args.warmup, None, (10, 10), schedulers)
                run_jobs(servers[mode][1], warm, fields)
        if args.capacity is None:
            burst = make_workload("capacity", args.seed, args.capacity_requests, None, steps, schedulers)
            capacity_run = measure("capacity", "static", servers["static"], burst, fields, None)
            capacity = capacity_run.summary["throughput_rps"]
        else:
            capacity = args.capacity
        rates = [f * capacity for f in fractions]
        estimate = sum(3 * c / r for c, r in zip(counts, rates))
        print(f"static capacity {capacity:.3f} req/s; rates {', '.join(f'{r:.3f}' for r in rates)} req/s; "
              f"at least {estimate / 60:.0f} min of arrivals to come", file=sys.stderr, flush=True)
        for i, (name, rate, count) in enumerate(zip(rate_names, rates, counts)):
            jobs = make_workload(f"rate-{i}", args.seed, count, rate, steps, schedulers)
            order = MODES[i % 3:] + MODES[: i % 3]  # rotate, so no server always goes first
            for mode in order:
                runs.append(measure(name, mode, servers[mode], jobs, fields, rate))
    finally:
        stop_servers(servers)
    after = machine()
    total_min = (time.perf_counter() - started) / 60

    by = {(r.rate_name, r.mode): r.summary for r in runs}
    model_line = (f"model: {model_dir.name} ({args.preset} preset)" if preset_model else f"model: {model_dir}")
    lines = [
        model_line + f", {args.size}x{args.size}" if args.size else model_line + ", native size",
        (f"workload: Poisson arrivals (seed {args.seed}); steps uniform {steps[0]}-{steps[1]}; schedulers "
         f"{'/'.join(schedulers)} uniform; guidance {args.guidance:g}; 1 image; own prompt and seed per request"),
        f"servers (`diffusiond serve --threads {args.threads} --max-queue 256 --metrics-port P` and):",
        *[f"  {mode}: `{' '.join(flags[mode])}`" for mode in MODES],
        f"machine: {before['cpu']}, {before['cores']} cores; Python {before['python']}, torch {before['torch']}",
        (f"load average before: {before['loadavg']} ({before['time_utc']} UTC); "
         f"after: {after['loadavg']} ({after['time_utc']} UTC); {total_min:.1f} min in all"),
    ]
    if capacity_run is not None:
        lines.append(f"static capacity: {capacity:.3f} req/s ({args.capacity_requests} requests sent at once to the "
                     f"static server; completed / first send to last result)")
    else:
        lines.append(f"static capacity: {capacity:.3f} req/s (given with --capacity)")
    lines.append("rates: " + ", ".join(f"{name} = {f:g} x capacity = {r:.3f} req/s ({c} requests)"
                                       for name, f, r, c in zip(rate_names, fractions, rates, counts)))
    lines += [
        "",
        ("| rate | mode | req/s offered | done | req/s | P50 s | P99 s | TTFS P50 s | TTFS P99 s | step s "
         "| req/UNet call |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rate in zip(rate_names, rates):
        for mode in MODES:
            s = by[(name, mode)]
            lines.append(
                f"| {name} | {mode} | {rate:.3f} | {s['completed']}/{s['completed'] + s['failed']} | "
                f"{_fmt(s['throughput_rps'], 3)} | {_fmt(s['latency_p50_s'])} | {_fmt(s['latency_p99_s'])} | "
                f"{_fmt(s['ttfs_p50_s'])} | {_fmt(s['ttfs_p99_s'])} | {_fmt(s['step_time_s'], 3)} | "
                f"{_fmt(s['requests_per_unet_call'])} |"
            )

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def ttfs_steps(name: str) -> float:
        return by[(name, "continuous")]["ttfs_p50_s"] / by[(name, "continuous")]["step_time_s"]

    mid = rate_names[1]
    cont, stat = by[(mid, "continuous")], by[(mid, "static")]
    p99_ratio = cont["latency_p99_s"] / stat["latency_p99_s"]
    ttfs_ratio = ttfs_steps(mid)
    checks = {
        "p99_latency_continuous_over_static_at_70pct": {
            "value": p99_ratio, "target": "<= 0.7", "pass": p99_ratio <= 0.7},
        "ttfs_p50_over_step_time_continuous_at_70pct": {
            "value": ttfs_ratio, "target": "<= 1.5", "pass": ttfs_ratio <= 1.5},
    }
    lines += [
        "",
        (f"- P99 latency at the 70% rate, continuous / static: {cont['latency_p99_s']:.2f} / "
         f"{stat['latency_p99_s']:.2f} s = **{p99_ratio:.2f}x** (target <= 0.7x): {verdict(p99_ratio <= 0.7)}"),
        (f"- TTFS P50 at the 70% rate, continuous: {cont['ttfs_p50_s']:.3f} s = **{ttfs_ratio:.2f}** step times of "
         f"{cont['step_time_s']:.3f} s (target <= 1.5): {verdict(ttfs_ratio <= 1.5)}"
         + "".join(f"; at the {name} rate: {ttfs_steps(name):.2f}" for name in rate_names if name != mid)),
    ]
    for name in rate_names:
        c, s = by[(name, "continuous")], by[(name, "static")]
        ratio = c["throughput_rps"] / s["throughput_rps"]
        checks[f"throughput_continuous_over_static_at_{name}"] = {
            "value": ratio, "target": ">= 1.0", "pass": ratio >= 1.0}
        lines.append(
            f"- throughput at the {name} rate, continuous / static: {c['throughput_rps']:.3f} / "
            f"{s['throughput_rps']:.3f} req/s = **{ratio:.3f}x** (target >= 1): {verdict(ratio >= 1.0)}"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "machine_before": before, "machine_after": after, "args": {k: str(v) for k, v in vars(args).items()},
            "server_flags": flags, "server_commands": {mode: server[3] for mode, server in servers.items()},
            "static_capacity_rps": capacity,
            "capacity_run": None if capacity_run is None else {**asdict(capacity_run)},
            "rates": {name: {"fraction": f, "rps": r, "requests": c}
                      for name, f, r, c in zip(rate_names, fractions, rates, counts)},
            "runs": [asdict(r) for r in runs],
            "checks": checks,
        }, indent=2))
    return 0


# -- closed loop (the earlier benchmark) ----------------------------------------------------------


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
        return nearest_rank(self.latencies_s, q)

    @property
    def mean_batch(self) -> float:
        return self.batched_requests / self.batches if self.batches else 0.0


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


def closed_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/serving.py closed",
        description="Closed loop: batching off and on at several concurrencies, identical requests.",
    )
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the small preset)")
    parser.add_argument("--preset", default="small", help="synthetic preset created when --model is absent")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=4, help="measured requests per client")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many measured requests")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=50.0)
    parser.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                        help="the batching server's --batching")
    parser.add_argument("--threads", type=int, default=2, help="server inference threads")
    parser.add_argument("--rounds", type=int, default=2, help="measurement rounds, alternating the order (ABBA)")
    parser.add_argument("--paired-requests", type=int, default=16,
                        help="requests per server for the paired latency check at concurrency 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.model is None:
        args.model = default_model_dir(args.preset)
    model_dir = ensure_model(args.model, args.preset)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    fields = dict(steps=args.steps, scheduler=args.scheduler)
    before = machine()

    modes = {
        "off": ["--max-batch-size", "1", "--max-batch-delay-ms", "0"],
        "on": ["--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms),
               "--batching", args.batching],
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
        stop_servers(servers)

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "closed":
        return closed_main(argv[1:])
    if argv and argv[0] == "open":
        argv = argv[1:]
    return open_main(argv)


if __name__ == "__main__":
    sys.exit(main())
