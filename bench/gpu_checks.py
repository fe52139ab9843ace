"""GPU checks in one command: TensorRT engines against eager PyTorch, and real-size speed, on a CUDA machine.

    python bench/gpu_checks.py [--work DIR] [--out DIR] [--budget-s 420] [--no-real-size]

For two models, the built-in one (64x64) and the ``sd15-half`` synthetic
preset (SD 1.5 at half width, created here like ``diffusiond create-model``;
256x256), one run:

1. times eager PyTorch on CUDA in fp32 and fp16: one guided UNet step (batch
   2) and one image end to end (text encoding, every step, VAE decode);
2. exports the model to ONNX fp16 (``diffusiond export onnx --precision fp16``);
3. where TensorRT is installed: builds fp16 engines for that one size
   (``diffusiond export tensorrt``), checks the TensorRT UNet against eager
   fp16 on the same inputs (cosine >= 0.999 and max |diff| <= 2% of max |ref|),
   and the VAE encoder engine (image inputs) against the eager fp32 encoder on
   the CPU (same bounds), and times the same UNet step and image on the
   tensorrt backend;
4. where it is not: says what it skipped and why, and runs the rest.

5. first of all, real size (``--no-real-size`` skips it): the SD 1.5 architecture (seeded
   random weights, like ``create-model --preset sd15``) at 512x512, 30 DDIM
   steps, guidance 7.5, 1 and 4 images per request, in process: eager fp16,
   eager bf16, eager fp16 with step caching (every 3rd step full, depth 1),
   and the ``torch-compiled`` backend (CUDA graphs) with and without step
   caching where that plug-in is installed; then the fastest of them end to
   end through a real gRPC ``Generate`` on loopback. Each with its peak GPU
   memory, against the goal of 0.25 s per image. ONNX Runtime (CUDA) and
   TensorRT are not run at this size (an SD 1.5 export and engine build do not
   fit the budget): the report lists them as skipped, saying so.

Every speed is also given as a ratio against eager fp32 and eager fp16 of the
same run. Results go to OUT/gpu_checks.json and OUT/gpu_checks.md. The whole
run keeps to ``--budget-s`` (small sizes, few steps; phases that would not fit
are skipped and listed). Without a CUDA GPU it stops at once with an error.
Exit status: 0 when everything that ran passed, 1 on a failed check or error,
2 without CUDA, 3 when the time limit cut it short.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_checks")

# TensorRT fp16 UNet vs eager fp16 UNet on identical inputs.
PARITY_MIN_COSINE = 0.999
PARITY_MAX_REL_ERROR = 0.02  # max |trt - eager| / max |eager|


@dataclass(frozen=True)
class Case:
    name: str
    size: int  # image side, pixels
    steps: int
    unet_repeats: int
    image_repeats: int
    needs_s: float  # the least budget left worth starting this model with


CASES = (
    Case("builtin", 64, 10, 30, 3, 30),
    Case("sd15-half", 256, 10, 10, 2, 150),
)
REAL_SIZE = Case("sd15", 512, 30, 5, 2, 200)
GOAL_S_PER_IMAGE = 0.25  # 512x512, 30 steps, on an H100/H200-class GPU
REAL_BATCHES = (1, 4)
STEP_CACHE_INTERVAL = 3
COMPILE_NEEDS_S = 180  # budget left before starting a compiled configuration (its compiles come first)


class OutOfTime(BaseException):  # not caught by the per-phase `except Exception`
    pass


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)


def cuda_timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn`` with the GPU drained before and after each run."""
    import torch

    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), runs


class Checks:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work)
        self.budget = Budget(args.budget_s)
        self.rows: list[dict] = []  # one per (model, configuration)
        self.parity: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self.exports: list[dict] = []
        self.real_size: list[dict] = []

    # -- helpers --------------------------------------------------------------------------

    def skip(self, what: str, why: str) -> None:
        log.warning("SKIPPED %s: %s", what, why)
        self.skipped.append({"what": what, "why": why})

    def error(self, what: str, exc: BaseException) -> None:
        log.error("FAILED %s: %s", what, exc)
        self.errors.append({"what": what, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=8)})

    @staticmethod
    def release() -> None:
        import torch

        gc.collect()
        torch.cuda.empty_cache()

    def unet_inputs(self, case: Case, context_dim: int):
        import torch

        g = torch.Generator().manual_seed(0)
        h = case.size // 8
        sample = torch.randn(2, 4, h, h, generator=g).cuda()
        timestep = torch.full((2,), 501.0, device="cuda")
        context = torch.randn(2, 77, context_dim, generator=g).cuda()
        return sample, timestep, context

    def request(self, case: Case, model):
        from diffusiond.service.resolver import GenerationParams, resolve

        params = GenerationParams(
            request_id="gpu-checks", prompt="a red fox in the snow", width=case.size, height=case.size,
            steps=case.steps, guidance_scale=7.5, seed=42, scheduler="ddim",
        )
        return resolve(params, model)

    def measure(self, case: Case, label: str, model, inputs, reference=None) -> tuple[dict, object]:
        """Time one UNet step and one image on a loaded model; return (row, UNet output on ``inputs``)."""
        import torch

        from diffusiond.eval.compare import psnr

        backend = model.backend
        with torch.inference_mode():
            out = backend.unet(*inputs).float()
            step_s, step_runs = cuda_timed(lambda: backend.unet(*inputs), case.unet_repeats)

            def generate():
                result = model.pipeline.generate(self.request(case, model))
                generate.image = result.images_uint8()

            generate()  # warm-up: kernels, caches, allocator
            image_s, image_runs = cuda_timed(generate, case.image_repeats)
        row = {
            "model": case.name, "size": case.size, "steps": case.steps, "config": label,
            "unet_step_ms": round(step_s * 1e3, 3), "unet_step_runs_ms": [round(r * 1e3, 3) for r in step_runs],
            "image_s": round(image_s, 4), "image_runs_s": [round(r, 4) for r in image_runs],
        }
        if reference is not None:
            row["image_psnr_vs_eager_fp16_db"] = round(psnr(generate.image, reference), 2)
        log.info("%s %s: UNet step %.3f ms, image %.3f s", case.name, label, step_s * 1e3, image_s)
        self.rows.append(row)
        return row, (out, generate.image)

    # -- phases ---------------------------------------------------------------------------

    def model_dir(self, case: Case) -> Path:
        from diffusiond.models.builtin import ensure_builtin_model
        from diffusiond.models.synthetic import write_sd_model

        if case.name == "builtin":
            return ensure_builtin_model(self.work / "cache")
        path = self.work / case.name
        if not (path / "model_index.json").is_file():
            started = time.perf_counter()
            write_sd_model(path, case.name)  # what `diffusiond create-model --preset sd15-half` writes
            log.info("created %s in %.1f s", path, time.perf_counter() - started)
        return path

    def eager(self, case: Case, model_dir: Path, dtype: str, inputs, reference=None):
        from diffusiond.backends.base import BackendSettings
        from diffusiond.service.models import load_model

        model = load_model(case.name, model_dir, "torch", BackendSettings(device="cuda", dtype=dtype))
        try:
            return self.measure(case, f"eager {dtype}", model, inputs, reference)
        finally:
            model.backend.close()
            del model
            self.release()

    def export(self, case: Case, model_dir: Path) -> Path:
        from diffusiond.export.onnx_export import ExportOptions, export_onnx
        from diffusiond.models.descriptors import Range, ShapeProfile

        size = Range(case.size, case.size, case.size)
        options = ExportOptions(
            precision="fp16", profile=ShapeProfile(images=Range(1, 1, 1), height=size, width=size),
            verify=self.args.verify_export,
        )
        started = time.perf_counter()
        result = export_onnx(model_dir, self.work / f"onnx-fp16-{case.name}", options)
        seconds = time.perf_counter() - started
        self.exports.append({"model": case.name, "what": "onnx fp16", "seconds": round(seconds, 1),
                             "reused": result.reused, "verified": self.args.verify_export,
                             "mb": round(sum(c.bytes for c in result.manifest.components.values()) / 1e6, 1)})
        return result.directory

    def tensorrt(self, case: Case, onnx_dir: Path, inputs, eager_fp16_out, reference_image, model_dir: Path) -> None:
        import torch

        from diffusiond.backends.base import BackendSettings
        from diffusiond.export.tensorrt_build import EngineBuildOptions, build_engines
        from diffusiond.service.models import load_model

        started = time.perf_counter()
        options = EngineBuildOptions(precision="fp16", workspace_gib=self.args.workspace_gib,
                                     optimization_level=self.args.trt_opt_level)
        out = self.work / f"trt-fp16-{case.name}"
        manifest, reused = build_engines(onnx_dir, out, options)
        self.exports.append({"model": case.name, "what": f"tensorrt fp16 engines (level {options.optimization_level})",
                             "seconds": round(time.perf_counter() - started, 1), "reused": reused,
                             "mb": round(sum(c["bytes"] for c in manifest.components.values()) / 1e6, 1)})
        image = torch.rand((1, 3, case.size, case.size), generator=torch.Generator().manual_seed(0)) * 2 - 1
        model = load_model(case.name, out, "tensorrt", BackendSettings(device="cuda"))
        try:
            _, (trt_out, _) = self.measure(case, "tensorrt fp16", model, inputs, reference_image)
            with torch.inference_mode():
                trt_latents = model.backend.vae_encode(image.cuda()).float().cpu()
        finally:
            model.backend.close()
            del model
            self.release()
        self.compare(case, "UNet, TensorRT fp16 vs eager fp16, same inputs", trt_out, eager_fp16_out)
        cpu = load_model(case.name, model_dir, "torch", BackendSettings(device="cpu"))
        try:
            eager_latents = cpu.backend.vae_encode(image)
        finally:
            cpu.backend.close()
        self.compare(case, "VAE encoder (image inputs), TensorRT vs eager fp32 on the CPU", trt_latents, eager_latents)

    def compare(self, case: Case, what: str, got, ref) -> None:
        import torch

        ref, got = ref.double().cpu(), got.double().cpu()
        diff = (got - ref).abs().max().item()
        rel = diff / max(ref.abs().max().item(), 1e-12)
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        passed = cosine >= PARITY_MIN_COSINE and rel <= PARITY_MAX_REL_ERROR and bool(torch.isfinite(got).all())
        self.parity.append({"model": case.name, "what": what,
                            "cosine": round(cosine, 6), "max_abs_error": diff, "max_rel_error": round(rel, 5),
                            "tolerance": f"cosine >= {PARITY_MIN_COSINE}, max rel <= {PARITY_MAX_REL_ERROR}",
                            "passed": passed})
        (log.info if passed else log.error)("%s %s: cosine %.6f, max rel %.4f -> %s",
                                            case.name, what, cosine, rel, "PASS" if passed else "FAIL")

    def run_case(self, case: Case, trt_reason: str | None) -> None:
        import torch

        if self.budget.left() < case.needs_s:
            self.skip(f"{case.name}: everything", f"{self.budget.left():.0f} s of the time budget left, it needs ~{case.needs_s:.0f} s")
            return
        model_dir = self.model_dir(case)
        from diffusiond.models.descriptors import SDDims

        inputs = self.unet_inputs(case, SDDims.from_model_dir(model_dir).text_hidden_size)
        self.eager(case, model_dir, "fp32", inputs)
        # The eager fp16 UNet output and image are what TensorRT is compared with.
        _, (fp16_out, fp16_image) = self.eager(case, model_dir, "fp16", inputs)
        if self.budget.left() < 60:
            self.skip(f"{case.name}: ONNX export and TensorRT", f"{self.budget.left():.0f} s of the time budget left")
            return
        try:
            onnx_dir = self.export(case, model_dir)
        except Exception as exc:
            self.error(f"{case.name}: ONNX fp16 export", exc)
            return
        if trt_reason is not None:
            self.skip(f"{case.name}: TensorRT engine build, UNet parity, TensorRT timings", trt_reason)
            return
        if self.budget.left() < 90:
            self.skip(f"{case.name}: TensorRT", f"{self.budget.left():.0f} s of the time budget left")
            return
        try:
            self.tensorrt(case, onnx_dir, inputs, fp16_out, fp16_image, model_dir)
        except Exception as exc:
            self.error(f"{case.name}: TensorRT", exc)
        del inputs
        torch.cuda.empty_cache()

    # -- real size ----------------------------------------------------------------------------

    def real_size_configs(self) -> list[tuple[str, str, str, int]]:
        """(label, backend, dtype, cache interval) for the real-size phase, most important first."""
        from diffusiond.backends.registry import plugins

        configs = [("eager fp16", "torch", "fp16", 1), ("eager fp16 + step cache", "torch", "fp16", STEP_CACHE_INTERVAL),
                   ("eager bf16", "torch", "bf16", 1)]
        if "torch-compiled" in plugins():
            configs += [("compiled fp16 (CUDA graphs)", "torch-compiled", "fp16", 1),
                        ("compiled fp16 (CUDA graphs) + step cache", "torch-compiled", "fp16", STEP_CACHE_INTERVAL)]
        else:
            self.skip("real size: torch-compiled", "the torch-compiled backend plug-in is not installed")
        self.skip("real size: ONNX Runtime CUDA and TensorRT",
                  "an SD 1.5 export and engine build take longer than this run's budget; the sd15-half phase "
                  "above compares TensorRT with eager, and ONNX Runtime's CUDA provider needs onnxruntime-gpu")
        return configs

    def real_request(self, model, images: int, cache_interval: int):
        from diffusiond.service.resolver import GenerationParams, resolve

        case = REAL_SIZE
        params = GenerationParams(
            request_id="gpu-real-size", prompt="a red fox in the snow", width=case.size, height=case.size,
            steps=case.steps, guidance_scale=7.5, seed=42, scheduler="ddim", num_images=images,
            cache_interval=cache_interval, cache_depth=1,
        )
        return resolve(params, model)

    def run_real_size(self) -> None:
        """SD 1.5 at 512x512, 30 steps: seconds per image, in process and through gRPC, and peak memory."""
        import torch

        from diffusiond.backends.base import BackendSettings
        from diffusiond.eval.compare import psnr
        from diffusiond.service.models import load_model

        case = REAL_SIZE
        if self.budget.left() < case.needs_s:
            self.skip("real size: everything", f"{self.budget.left():.0f} s of the time budget left, "
                      f"it needs ~{case.needs_s:.0f} s")
            return
        model_dir = self.model_dir(case)
        reference = None
        loaded: dict[tuple[str, str], object] = {}
        for label, backend, dtype, interval in self.real_size_configs():
            if self.budget.left() < (COMPILE_NEEDS_S if backend == "torch-compiled" else 60):
                self.skip(f"real size: {label}", f"{self.budget.left():.0f} s of the time budget left")
                continue
            try:
                key = (backend, dtype)
                if key not in loaded:
                    for other in loaded.values():
                        other.backend.close()
                    loaded.clear()
                    self.release()
                    started = time.perf_counter()
                    loaded[key] = load_model(case.name, model_dir, backend, BackendSettings(device="cuda", dtype=dtype))
                    log.info("real size: loaded %s %s in %.1f s", backend, dtype, time.perf_counter() - started)
                model = loaded[key]
                row = {"config": label, "backend": backend, "dtype": dtype, "cache_interval": interval}
                for images in REAL_BATCHES:
                    request = self.real_request(model, images, interval)
                    started = time.perf_counter()
                    model.pipeline.generate(request)  # warm-up (and, compiled, its compiles) at this batch
                    warm_s = time.perf_counter() - started
                    torch.cuda.reset_peak_memory_stats()
                    seconds, runs = cuda_timed(lambda r=request, m=model: m.pipeline.generate(r), case.image_repeats)
                    image = model.pipeline.generate(self.real_request(model, 1, interval)).images_uint8()
                    row[f"s_per_image_batch_{images}"] = round(seconds / images, 4)
                    row[f"runs_s_batch_{images}"] = [round(r, 4) for r in runs]
                    row[f"first_call_s_batch_{images}"] = round(warm_s, 2)
                    row[f"peak_gb_batch_{images}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if reference is None:
                    reference = image
                row["psnr_vs_eager_fp16_db"] = round(min(psnr(image, reference), 99.0), 2)
                self.real_size.append(row)
                log.info("real size %s: %.3f s/image (1), %.3f s/image (4)", label,
                         row["s_per_image_batch_1"], row["s_per_image_batch_4"])
            except OutOfTime:
                raise
            except Exception as exc:
                self.error(f"real size: {label}", exc)
        for other in loaded.values():
            other.backend.close()
        loaded.clear()
        self.release()
        if self.real_size:
            fastest = min(self.real_size, key=lambda r: r["s_per_image_batch_1"])
            if self.budget.left() < (COMPILE_NEEDS_S if fastest["backend"] == "torch-compiled" else 60):
                self.skip("real size: through gRPC", f"{self.budget.left():.0f} s of the time budget left")
                return
            try:
                self.real_size_grpc(model_dir, fastest)
            except OutOfTime:
                raise
            except Exception as exc:
                self.error("real size: through gRPC", exc)

    def real_size_grpc(self, model_dir: Path, config: dict) -> None:
        """The fastest in-process configuration again, end to end through a gRPC Generate on loopback."""
        from diffusiond.backends.base import BackendSettings
        from diffusiond.client import DiffusionClient
        from diffusiond.models.sources import ModelSource
        from diffusiond.server.app import ServerSettings, ServerThread

        case = REAL_SIZE
        settings = ServerSettings(
            host="127.0.0.1", port=0, models=[ModelSource(case.name, str(model_dir))], backend=config["backend"],
            backend_settings=BackendSettings(device="cuda", dtype=config["dtype"]), max_size=1024,
        )
        thread = ServerThread(settings)
        thread.start(timeout=max(60.0, self.budget.left()))
        try:
            with DiffusionClient(thread.address, timeout=300) as client:
                row = {"config": f"{config['config']}, through gRPC", "backend": config["backend"],
                       "dtype": config["dtype"], "cache_interval": config["cache_interval"]}
                for images in REAL_BATCHES:
                    def call(n=images):
                        client.generate("a red fox in the snow", width=case.size, height=case.size, steps=case.steps,
                                        guidance_scale=7.5, seed=42, scheduler="ddim", num_images=n,
                                        cache_interval=config["cache_interval"], cache_depth=1)

                    call()
                    seconds, runs = cuda_timed(call, case.image_repeats)
                    row[f"s_per_image_batch_{images}"] = round(seconds / images, 4)
                    row[f"runs_s_batch_{images}"] = [round(r, 4) for r in runs]
                self.real_size.append(row)
        finally:
            thread.stop()
            self.release()

    # -- results --------------------------------------------------------------------------

    def add_ratios(self) -> None:
        base = {(r["model"], r["config"]): r for r in self.rows}
        for row in self.rows:
            for ref in ("eager fp32", "eager fp16"):
                b = base.get((row["model"], ref))
                if b is None:
                    continue
                key = ref.replace(" ", "_")
                row[f"unet_speedup_vs_{key}"] = round(b["unet_step_ms"] / row["unet_step_ms"], 2)
                row[f"image_speedup_vs_{key}"] = round(b["image_s"] / row["image_s"], 2)

    def markdown(self, info: dict) -> str:
        m = info["machine"]
        lines = [
            f"GPU checks, {info['date']}: {m['gpu']} (compute capability {m['compute_capability']}), "
            f"torch {m['torch']} (CUDA {m['cuda']}), TensorRT {m['tensorrt'] or 'not installed'}; "
            f"load before: {m['loadavg_at_start']}; {info['elapsed_s']} s in all.",
            "",
            "| model | size | config | UNet step, batch 2 (ms) | vs eager fp32 | vs eager fp16 "
            "| image, N steps (s) | vs eager fp32 | vs eager fp16 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['model']} | {r['size']} | {r['config']} | {r['unet_step_ms']:.2f} "
                f"| {r.get('unet_speedup_vs_eager_fp32', '')}x | {r.get('unet_speedup_vs_eager_fp16', '')}x "
                f"| {r['image_s']:.3f} ({r['steps']}) | {r.get('image_speedup_vs_eager_fp32', '')}x "
                f"| {r.get('image_speedup_vs_eager_fp16', '')}x |"
            )
        lines.append("")
        lines.append("Ratios are speed-ups: eager time / this configuration's time, measured in the same run.")
        for p in self.parity:
            lines.append(f"- parity {p['model']}: {p['what']}: cosine {p['cosine']}, max rel error "
                         f"{p['max_rel_error']} ({p['tolerance']}): {'PASS' if p['passed'] else 'FAIL'}")
        for e in self.exports:
            lines.append(f"- {e['model']}: {e['what']}: {e['seconds']} s, {e['mb']} MB"
                         + (" (reused)" if e.get("reused") else ""))
        if self.real_size:
            lines += [
                "",
                f"Real size: SD 1.5 architecture, {REAL_SIZE.size}x{REAL_SIZE.size}, {REAL_SIZE.steps} DDIM steps, "
                f"guidance 7.5 (goal: {GOAL_S_PER_IMAGE} s per image):",
                "",
                "| config | s/image, 1 image | s/image, 4 images | peak GB (1 / 4) | PSNR vs eager fp16 | goal |",
                "|---|---|---|---|---|---|",
            ]
            for r in self.real_size:
                peak = f"{r.get('peak_gb_batch_1', '-')} / {r.get('peak_gb_batch_4', '-')}"
                best = min(r["s_per_image_batch_1"], r["s_per_image_batch_4"])
                lines.append(
                    f"| {r['config']} | {r['s_per_image_batch_1']:.3f} | {r['s_per_image_batch_4']:.3f} | {peak} "
                    f"| {r.get('psnr_vs_eager_fp16_db', '-')} | {'met' if best <= GOAL_S_PER_IMAGE else 'missed'} |"
                )
        for s in self.skipped:
            lines.append(f"- SKIPPED {s['what']}: {s['why']}")
        for e in self.errors:
            lines.append(f"- ERROR {e['what']}: {e['error']}")
        return "\n".join(lines) + "\n"

    def write(self, machine: dict, finished: bool) -> dict:
        self.add_ratios()
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine,
            "elapsed_s": round(time.monotonic() - self.budget.started, 1),
            "finished": finished,
            "rows": self.rows, "parity": self.parity, "exports": self.exports, "real_size": self.real_size,
            "skipped": self.skipped, "errors": self.errors,
        }
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_checks.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        text = self.markdown(info)
        (out / "gpu_checks.md").write_text(text)
        sys.stdout.write(text)
        return info


def tensorrt_absent_reason() -> tuple[str | None, str | None]:
    """(TensorRT version, None) or (None, why it cannot be used)."""
    from diffusiond.errors import DiffusiondError
    from diffusiond.models.tensorrt_artifact import import_tensorrt

    try:
        return import_tensorrt().__version__, None
    except DiffusiondError as exc:
        return None, str(exc)


def machine_info(trt_version: str | None) -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return {
        "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "tensorrt": trt_version,
        "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "loadavg_at_start": " ".join(load),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "gpu-checks"),
                        help="models, exports and engines (reused by a second run)")
    parser.add_argument("--out", default="", help="where the JSON and Markdown go (default: --work)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole run (+60 s grace)")
    parser.add_argument("--models", default="builtin,sd15-half", help="comma-separated: builtin, sd15-half")
    parser.add_argument("--trt-opt-level", type=int, default=3, help="TensorRT builder optimisation level")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--verify-export", action="store_true",
                        help="check the ONNX networks against PyTorch on the CPU too (slower)")
    parser.add_argument("--no-real-size", action="store_true",
                        help="skip the SD 1.5 512x512 speed phase (it runs first, within the budget)")
    args = parser.parse_args()
    args.out = args.out or args.work
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}")
    wanted = [c for c in CASES if c.name in names]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The fp16 converter logs every initializer shared by fp32 and fp16 nodes at INFO: thousands of lines.
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)

    import torch

    if not torch.cuda.is_available():
        sys.stderr.write(
            f"gpu_checks: FAILED: no CUDA GPU is visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none, a CPU-only build'}); run this on a CUDA machine\n"
        )
        return 2
    os.environ.setdefault("DIFFUSIOND_CACHE", str(Path(args.work) / "cache"))
    trt_version, trt_reason = tensorrt_absent_reason()
    machine = machine_info(trt_version)
    log.info("%s, torch %s, TensorRT %s", machine["gpu"], machine["torch"], trt_version or f"absent ({trt_reason})")
    checks = Checks(args)

    def out_of_time(signum, frame):
        raise OutOfTime(f"the {args.budget_s:.0f} s budget (+60 s grace) ran out")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.budget_s) + 60)
    finished = True
    try:
        if not args.no_real_size:  # first: the figures the speed goal is about
            checks.run_real_size()
        for case in wanted:
            try:
                checks.run_case(case, trt_reason)
            except OutOfTime:
                raise
            except Exception as exc:
                checks.error(case.name, exc)
                checks.release()
    except OutOfTime as exc:
        checks.skip("the rest of the run", str(exc))
        finished = False
    finally:
        signal.alarm(0)
    info = checks.write(machine, finished)
    if not finished:
        return 3
    failed = info["errors"] or any(not p["passed"] for p in info["parity"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
