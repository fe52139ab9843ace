"""CPU benchmark: eager PyTorch vs ONNX Runtime (fp32, fp16, INT8 variants) vs plain diffusers.

    .venv/bin/python bench/onnx_cpu.py [--size 256] [--steps 10] [--repeats 2]

One run measures, on the same machine and model: per-step UNet latency (one
guided step: batch 2) and end-to-end latency for one image (text encoding,
every step, VAE decode) for

- diffusers ``StableDiffusionPipeline`` fp32, in process: the baseline;
- diffusiond eager PyTorch fp32 and bf16 (bf16 runs once: without AVX512-BF16
  or AMX PyTorch emulates it, many times slower);
- diffusiond ONNX Runtime fp32, fp16 (end to end only where its UNet step is
  not slower than fp32), and INT8 UNets in several formats / type pairs
  (all from one set of calibration ranges).

Every diffusiond configuration runs the same request as the baseline (same
seed, scheduler, size), and its final latents and image are compared with
eager fp32 (cosine similarity, PSNR). The model is the ``sd15-half`` preset
(SD 1.5 architecture at half width, real CLIP-L text encoder: CPU-sized),
created on first use. Results go to ``--work``/results.json and print as
Markdown tables (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")

# name -> Int8Settings fields. The first is the export default (TensorRT's form).
INT8_VARIANTS = {
    "qdq-s8s8-sym-per-channel": dict(),
    "qdq-u8s8-per-channel": dict(activation_type="uint8", symmetric_activations=False),
    "qdq-u8s8-per-tensor": dict(activation_type="uint8", symmetric_activations=False, per_channel=False),
    "qdq-u8s8-per-channel-reduce-range": dict(activation_type="uint8", symmetric_activations=False, reduce_range=True),
    "qoperator-u8s8-per-channel": dict(quant_format="qoperator", activation_type="uint8", symmetric_activations=False),
    "qdq-u8s8-conv-only": dict(activation_type="uint8", symmetric_activations=False, op_types=("Conv",)),
}


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def machine() -> dict[str, str]:
    from diffusiond.backends import cpu_features

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {"cpu": model, "cores": str(os.cpu_count()), "features": cpu_features.describe(),
            "loadavg_at_start": " ".join(load), "python": platform.python_version()}


class Bench:
    def __init__(self, args) -> None:
        import torch

        self.args = args
        torch.set_num_threads(args.threads)
        self.work = Path(args.work)
        self.model_dir = Path(args.model) if args.model else self.work / "sd15-half"
        self.results: dict[str, dict] = {}
        self.reference_latents = None
        self.reference_image = None

    # -- inputs -------------------------------------------------------------------------

    def unet_inputs(self):
        import torch

        g = torch.Generator().manual_seed(0)
        h = self.args.size // 8
        return (torch.randn(2, 4, h, h, generator=g), torch.full((2,), 501.0),
                torch.randn(2, 77, self.text_width, generator=g))

    def request(self, model):
        from diffusiond.pipeline.request import PreviewKind
        from diffusiond.service.resolver import GenerationParams, PreviewParams, resolve

        params = GenerationParams(
            request_id="bench", prompt=self.args.prompt, width=self.args.size, height=self.args.size,
            steps=self.args.steps, guidance_scale=7.5, seed=42, scheduler=self.args.scheduler,
            preview=PreviewParams(PreviewKind.LATENT, every_n_steps=self.args.steps),
        )
        return resolve(params, model)

    # -- configurations ---------------------------------------------------------------------

    def run_diffusers(self) -> None:
        import diffusers
        import torch
        from diffusers import StableDiffusionPipeline

        from diffusiond.pipeline.schedulers import SCHEDULERS

        pipe = StableDiffusionPipeline.from_pretrained(self.model_dir, safety_checker=None, requires_safety_checker=False)
        spec = SCHEDULERS[self.args.scheduler]
        pipe.scheduler = getattr(diffusers, spec.class_name).from_config(pipe.scheduler.config, **spec.overrides)
        pipe.set_progress_bar_config(disable=True)
        sample, t, ctx = self.unet_inputs()
        with torch.inference_mode():
            pipe.unet(sample, t, ctx)
            step, _ = timed(lambda: pipe.unet(sample, t, ctx), self.args.unet_repeats)

        def generate():
            return pipe(self.args.prompt, height=self.args.size, width=self.args.size, num_inference_steps=self.args.steps,
                        guidance_scale=7.5, generator=torch.Generator().manual_seed(42), output_type="np").images

        generate()
        e2e, runs = timed(generate, self.args.repeats)
        self.record("diffusers StableDiffusionPipeline fp32 (baseline)", step, e2e, runs)
        pipe = None  # frees the pipeline; the closures above hold only its cell
        gc.collect()

    def run_ours(self, label: str, model_dir: Path, backend: str, dtype: str = "fp32", *, unet_repeats=None,
                 e2e_repeats=None, warm=True, e2e=True, extra: dict | None = None) -> float:
        import torch

        from diffusiond.backends.base import BackendSettings
        from diffusiond.eval.compare import cosine, psnr
        from diffusiond.pipeline.observers import LastLatentsObserver
        from diffusiond.service.models import load_model

        settings = BackendSettings(dtype=dtype, threads=self.args.threads)
        model = load_model("bench", model_dir, backend, settings)
        sample, t, ctx = self.unet_inputs()
        model.backend.unet(sample, t, ctx)
        step, _ = timed(lambda: model.backend.unet(sample, t, ctx), unet_repeats or self.args.unet_repeats)
        info = dict(extra or {})
        e2e_s, runs = float("nan"), []
        if e2e:
            def generate():
                observer = LastLatentsObserver()
                result = model.pipeline.generate(self.request(model), observer)
                generate.latents, generate.image = observer.latents, result.images_uint8()

            if warm:
                generate()
            e2e_s, runs = timed(generate, e2e_repeats or self.args.repeats)
            if self.reference_latents is None:
                self.reference_latents, self.reference_image = generate.latents, generate.image
            else:
                info["latent_cosine_vs_eager_fp32"] = round(cosine(generate.latents, self.reference_latents), 5)
                info["image_psnr_vs_eager_fp32_db"] = round(psnr(generate.image, self.reference_image), 2)
        self.record(label, step, e2e_s, runs, **info)
        model.backend.close()
        model = None  # frees the model; the closure above holds only its cell
        gc.collect()
        torch.set_num_threads(self.args.threads)
        return step

    def record(self, label: str, step: float, e2e: float, runs: list[float], **extra) -> None:
        self.results[label] = {"unet_step_s": round(step, 3), "e2e_s": round(e2e, 2) if e2e == e2e else None,
                               "e2e_runs_s": [round(r, 2) for r in runs], **extra}
        log.info("%s: UNet step %.3f s, end to end %s s %s", label, step, self.results[label]["e2e_s"], extra or "")

    # -- exports ---------------------------------------------------------------------------

    def export(self, precision: str, variant: str = ""):
        from diffusiond.export.calibration import CalibrationSettings
        from diffusiond.export.int8 import Int8Settings
        from diffusiond.export.onnx_export import ExportOptions, export_onnx
        from diffusiond.models.descriptors import Range, ShapeProfile

        size = Range(self.args.size, self.args.size, self.args.size * 2)
        options = ExportOptions(
            precision=precision,
            profile=ShapeProfile(images=Range(1, 1, 2), height=size, width=size),
            verify=False,
            calibration=CalibrationSettings(
                max_prompts=self.args.calibration_prompts, steps=self.args.calibration_steps,
                size=self.args.size, method=self.args.calibration_method,
            ),
            int8=Int8Settings(**INT8_VARIANTS.get(variant, {})),
        )
        name = f"{precision}-{variant}" if variant else precision
        started = time.perf_counter()
        result = export_onnx(self.model_dir, self.work / f"onnx-{name}", options)
        took = time.perf_counter() - started
        unet = result.manifest.components["unet"]
        log.info("export %s: %.0f s%s, UNet %.1f MB", name, took, " (reused)" if result.reused else "", unet.bytes / 1e6)
        return result, took

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        from diffusiond.models.descriptors import descriptors_for
        from diffusiond.models.synthetic import write_sd_model

        self.work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DIFFUSIOND_CACHE", str(self.work / "cache"))
        if not (self.model_dir / "model_index.json").is_file():
            log.info("creating the sd15-half model in %s", self.model_dir)
            write_sd_model(self.model_dir, "sd15-half")
        self.text_width = descriptors_for(self.model_dir)["unet"].dims.text_hidden_size
        info = {"machine": machine(), "args": vars(self.args), "exports": {}}

        exports = {}
        for precision in ("fp32", "fp16"):
            result, took = self.export(precision)
            exports[precision] = result
            info["exports"][precision] = {"seconds": round(took, 1), "reused": result.reused,
                                          "unet_bytes": result.manifest.components["unet"].bytes}
        variants = {}
        for name in self.args.int8_variants:
            result, took = self.export("int8", name)
            variants[name] = result
            info["exports"][f"int8 {name}"] = {"seconds": round(took, 1), "reused": result.reused,
                                               "unet_bytes": result.manifest.components["unet"].bytes,
                                               "calibration": result.manifest.calibration}

        fp32_bytes = exports["fp32"].manifest.components["unet"].bytes
        self.run_ours("diffusiond eager PyTorch fp32", self.model_dir, "torch", "fp32")
        self.run_diffusers()
        ort_fp32 = self.run_ours("diffusiond ONNX Runtime fp32", exports["fp32"].directory, "onnxruntime")
        fp16_step = self.run_ours("diffusiond ONNX Runtime fp16", exports["fp16"].directory, "onnxruntime",
                                  unet_repeats=2, e2e=False)
        if fp16_step <= ort_fp32:
            self.run_ours("diffusiond ONNX Runtime fp16", exports["fp16"].directory, "onnxruntime")
        else:
            self.results["diffusiond ONNX Runtime fp16"]["note"] = (
                f"UNet step {fp16_step / ort_fp32:.1f}x slower than ORT fp32 (no fp16 arithmetic on this CPU): "
                "end to end not run")
        for name, result in variants.items():
            unet_bytes = result.manifest.components["unet"].bytes
            self.run_ours(f"diffusiond ONNX Runtime int8 {name}", result.directory, "onnxruntime",
                          extra={"unet_size_vs_fp32": round(unet_bytes / fp32_bytes, 3)})
        self.results["diffusiond ONNX Runtime fp16"]["unet_size_vs_fp32"] = round(
            exports["fp16"].manifest.components["unet"].bytes / fp32_bytes, 3)
        if not self.args.skip_bf16:
            self.run_ours("diffusiond eager PyTorch bf16", self.model_dir, "torch", "bf16", unet_repeats=1,
                          e2e_repeats=1, warm=False, e2e=not self.args.skip_bf16_e2e)

        info["machine"]["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        info["results"] = self.results
        (self.work / "results.json").write_text(json.dumps(info, indent=2, default=str))
        print(self.markdown(info))

    def markdown(self, info: dict) -> str:
        base = self.results["diffusers StableDiffusionPipeline fp32 (baseline)"]
        ort = self.results["diffusiond ONNX Runtime fp32"]
        lines = [
            f"model: {self.model_dir.name}, {self.args.size}x{self.args.size}, {self.args.steps} steps "
            f"({self.args.scheduler}), guidance 7.5 (UNet batch 2), {self.args.threads} threads",
            f"machine: {info['machine']}",
            "",
            "| configuration | UNet step (s) | vs baseline | vs ORT fp32 | end to end (s) | vs baseline | latent cosine | image PSNR (dB) | UNet size vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in self.results.items():
            e2e = r["e2e_s"]
            e2e_text = "-" if e2e is None else f"{e2e:.2f}"
            e2e_ratio = "-" if e2e is None else f"{e2e / base['e2e_s']:.2f}"
            lines.append(
                f"| {label} | {r['unet_step_s']:.3f} | {r['unet_step_s'] / base['unet_step_s']:.2f} | "
                f"{r['unet_step_s'] / ort['unet_step_s']:.2f} | "
                f"{e2e_text} | {e2e_ratio} | "
                f"{r.get('latent_cosine_vs_eager_fp32', '-')} | {r.get('image_psnr_vs_eager_fp32_db', '-')} | "
                f"{r.get('unet_size_vs_fp32', '-')} |"
            )
        notes = [f"- {label}: {r['note']}" for label, r in self.results.items() if r.get("note")]
        return "\n".join(lines + [""] + notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="diffusers-format model (default: create sd15-half in --work)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-onnx"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--repeats", type=int, default=2, help="timed end-to-end runs per configuration (after a warm-up)")
    parser.add_argument("--unet-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    parser.add_argument("--int8-variants", nargs="*", default=list(INT8_VARIANTS), choices=list(INT8_VARIANTS))
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-bf16-e2e", action="store_true", help="time bf16's UNet step only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
