"""Served diffusiond against diffusers in-process, side by side on this CPU: every configuration in one table.

    .venv/bin/python bench/cpu_speed.py [--size 256] [--steps 10] [--repeats 3] [--json results.json]

The model is the ``sd15-half`` preset (SD 1.5's architecture at half width,
a real-size CLIP-L text encoder, seeded random weights), created on first use
under ``--work``. One image of ``--size`` pixels, ``--steps`` DDIM steps,
guidance 7.5, the same seed everywhere.

Baselines, in this process: diffusers' ``StableDiffusionPipeline`` fp32, and
bf16 where the CPU has native bf16 (AVX512-BF16/AMX), where bf16 is diffusers'
fast path. Served: every backend plug-in this installation has (torch fp32 and
bf16, torch-compiled, ONNX Runtime fp32 from an export made here, OpenVINO),
each exact and with step caching (``--cache-interval``, depth 1), through a
real gRPC ``Generate`` on loopback. Rounds alternate: each baseline, then each
configuration, ``--repeats`` times; the median is reported, as a ratio against
the baselines measured in the same run. Every image is compared with the exact
fp32 image (PSNR; 100 dB stands for identical).

Targets (the issue this answers): the fastest served configuration at most
0.5x diffusers fp32 with PSNR >= 30 dB, the fastest exact one at most 0.75x.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")
PROMPT = "a photograph of a red fox in the snow, detailed"
IDENTICAL_DB = 100.0


@dataclass
class Config:
    label: str
    backend: str
    model: str  # "source" or "onnx"
    dtype: str = "fp32"
    cache_interval: int = 1
    exact: bool = True
    times: list[float] = field(default_factory=list)
    image: np.ndarray | None = None
    thread: object = None


def machine() -> dict[str, str]:
    from diffusiond.backends import cpu_features

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": str(os.cpu_count()), "features": cpu_features.describe(),
            "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "python": platform.python_version()}


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    from diffusiond.eval.compare import psnr

    value = psnr(a.astype(float), b.astype(float))
    return IDENTICAL_DB if not np.isfinite(value) else float(value)


class Baseline:
    """diffusers' own pipeline, in this process."""

    def __init__(self, model_dir: Path, dtype: str, args) -> None:
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.label = f"diffusers StableDiffusionPipeline {dtype} (in process)"
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.args = args
        self.times: list[float] = []
        self.image: np.ndarray | None = None

    def run(self) -> None:
        import torch

        started = time.perf_counter()
        out = self.pipe(PROMPT, height=self.args.size, width=self.args.size, num_inference_steps=self.args.steps,
                        guidance_scale=7.5, generator=torch.Generator().manual_seed(42), output_type="np").images
        self.times.append(time.perf_counter() - started)
        self.image = (out[0] * 255).round().astype(np.uint8)


def start_server(config: Config, model_dir: Path, threads: int):
    from diffusiond.backends.base import BackendSettings
    from diffusiond.models.sources import ModelSource
    from diffusiond.server.app import ServerSettings, ServerThread

    settings = ServerSettings(
        host="127.0.0.1", port=0, models=[ModelSource("bench", str(model_dir))], backend=config.backend,
        backend_settings=BackendSettings(dtype=config.dtype, threads=threads),
    )
    thread = ServerThread(settings)
    thread.start(timeout=1800)
    return thread


def generate(config: Config, args) -> None:
    from diffusiond.client import DiffusionClient

    with DiffusionClient(config.thread.address, timeout=1800) as client:
        started = time.perf_counter()
        result = client.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, guidance_scale=7.5,
                                 seed=42, scheduler="ddim", cache_interval=config.cache_interval, cache_depth=1)
        config.times.append(time.perf_counter() - started)
    from PIL import Image

    config.image = np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


def configurations(args, available: set[str], native_bf16: bool) -> list[Config]:
    configs = [Config("torch fp32", "torch", "source")]
    if native_bf16:
        configs.append(Config("torch bf16", "torch", "source", "bf16"))
    if "torch-compiled" in available:
        configs.append(Config("torch-compiled fp32", "torch-compiled", "source"))
        if native_bf16:
            configs.append(Config("torch-compiled bf16", "torch-compiled", "source", "bf16"))
    configs.append(Config("onnxruntime fp32", "onnxruntime", "onnx"))
    if "openvino" in available:
        configs.append(Config("openvino fp32", "openvino", "onnx"))
        if native_bf16:
            configs.append(Config("openvino bf16", "openvino", "onnx", "bf16"))
    cached = [
        Config(f"{c.label} + step cache {args.cache_interval}", c.backend, c.model, c.dtype, args.cache_interval, False)
        for c in configs if c.backend in ("torch", "torch-compiled", "onnxruntime")
    ]
    return configs + cached


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "diffusiond" / "bench-cpu"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-interval", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from diffusiond.backends import cpu_features
    from diffusiond.backends.registry import plugins
    from diffusiond.export.onnx_export import ExportOptions, export_onnx
    from diffusiond.models.synthetic import write_sd_model

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(args.work)
    source = work / "sd15-half"
    if not (source / "model_index.json").exists():
        write_sd_model(source, "sd15-half", seed=0)
    onnx_dir = export_onnx(source, work / "sd15-half-onnx", ExportOptions(step_cache_depth=1)).directory
    native_bf16 = cpu_features.has_native_bf16()
    baselines = [Baseline(source, "fp32", args)] + ([Baseline(source, "bf16", args)] if native_bf16 else [])
    configs = configurations(args, set(plugins()), native_bf16)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        configs = [c for c in configs if c.label in wanted]

    servers: dict[tuple[str, str, str], object] = {}
    for config in configs:  # one server per backend, model and dtype; step caching is per request
        key = (config.backend, config.model, config.dtype)
        if key not in servers:
            print(f"starting {config.backend} {config.dtype} ...", file=sys.stderr)
            servers[key] = start_server(config, onnx_dir if config.model == "onnx" else source, threads)
        config.thread = servers[key]
    for baseline in baselines:
        baseline.run()  # warm-up
    for config in configs:
        generate(config, args)  # warm-up
        config.times.clear()

    started = time.perf_counter()
    for round_ in range(args.repeats):
        for baseline in baselines:
            baseline.run()
        for config in configs:
            generate(config, args)
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
    wall = time.perf_counter() - started
    for server in servers.values():
        server.stop()

    reference = next(c.image for c in configs if c.label == "torch fp32") if any(
        c.label == "torch fp32" for c in configs) else baselines[0].image
    fp32 = statistics.median(baselines[0].times)
    bf16 = statistics.median(baselines[1].times) if len(baselines) > 1 else None
    rows = []
    for entry in [*baselines, *configs]:
        median = statistics.median(entry.times)
        rows.append({
            "configuration": entry.label,
            "exact": getattr(entry, "exact", True),
            "seconds": round(median, 3),
            "runs": [round(t, 3) for t in entry.times],
            "vs_diffusers_fp32": round(median / fp32, 3),
            "vs_diffusers_bf16": round(median / bf16, 3) if bf16 else None,
            "psnr_vs_exact_fp32_db": round(psnr_db(entry.image, reference), 1),
        })

    served = [r for r in rows if not r["configuration"].startswith("diffusers")]
    good = [r for r in served if r["psnr_vs_exact_fp32_db"] >= 30.0]
    fastest = min(good, key=lambda r: r["seconds"]) if good else None
    fastest_exact = min((r for r in served if r["exact"]), key=lambda r: r["seconds"])
    print(f"\nmachine: {machine()}; torch {torch.__version__}; {args.size}x{args.size}, {args.steps} DDIM steps, "
          f"guidance 7.5, one image; median of {args.repeats} alternating rounds ({wall:.0f} s)\n")
    print("| configuration | s / image | vs diffusers fp32 | vs diffusers bf16 | PSNR vs exact fp32 (dB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        bf = f"{r['vs_diffusers_bf16']:.2f}x" if r["vs_diffusers_bf16"] else "-"
        print(f"| {r['configuration']} | {r['seconds']:.2f} | {r['vs_diffusers_fp32']:.2f}x | {bf} | "
              f"{r['psnr_vs_exact_fp32_db']:.1f} |")
    if fastest is not None:
        verdict = "MET" if fastest["vs_diffusers_fp32"] <= 0.5 else "MISSED"
        print(f"\nfastest served (PSNR >= 30 dB): {fastest['configuration']} at {fastest['vs_diffusers_fp32']:.2f}x "
              f"diffusers fp32 (target <= 0.5x: {verdict})")
    verdict = "MET" if fastest_exact["vs_diffusers_fp32"] <= 0.75 else "MISSED"
    print(f"fastest exact: {fastest_exact['configuration']} at {fastest_exact['vs_diffusers_fp32']:.2f}x diffusers fp32 "
          f"(target <= 0.75x: {verdict})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "args": vars(args),
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
