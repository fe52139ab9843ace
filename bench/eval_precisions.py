"""Quality of the built-in model per backend and precision: eager fp32 and bf16, ONNX Runtime fp32, fp16, int8.

    .venv/bin/python bench/eval_precisions.py [--num-prompts 200] [--work /tmp/diffusiond-eval]

Exports the built-in model to ONNX three times (``diffusiond export onnx``'s
code: fp32, fp16, and int8 calibrated on the model's own validation prompts,
``calibration_prompts.txt``), then runs ``diffusiond eval``'s code on the same
held-out prompts, seeds and sampling defaults for each (and on eager bf16, and
on the ``torch-compiled`` backend where it is installed), and prints a Markdown
table for BENCHMARKS.md: the scorer's accuracy per attribute, and how often
each configuration's reading of an image agrees with eager fp32's reading of
the same prompt and seed (an INT8 calibration that hurts shows in both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusiond.backends import registry as backends  # noqa: E402
from diffusiond.eval.run import EvalReport, EvalSettings, evaluate  # noqa: E402
from diffusiond.eval.scorer import ATTRIBUTES  # noqa: E402
from diffusiond.export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from diffusiond.models.builtin import ensure_builtin_model  # noqa: E402

log = logging.getLogger("bench")


def configurations(work: Path) -> list[tuple[str, EvalSettings]]:
    source = ensure_builtin_model()
    configs = [("eager PyTorch fp32", EvalSettings(backend="torch", precision="fp32")),
               ("eager PyTorch bf16", EvalSettings(backend="torch", dtype="bf16", precision="bf16"))]
    if "torch-compiled" in backends.plugins():
        configs.append(("torch-compiled fp32", EvalSettings(backend="torch-compiled", precision="fp32")))
    else:
        log.warning("no torch-compiled backend in this installation: its row is left out")
    for precision in ("fp32", "fp16", "int8"):
        out = work / f"builtin-onnx-{precision}"
        result = export_onnx(source, out, ExportOptions(precision=precision))
        log.info("%s: %s", out, "reused" if result.reused else "exported")
        configs.append((f"ONNX Runtime {precision}",
                        EvalSettings(model=f"builtin-{precision}={out}", backend="onnxruntime", precision=precision)))
    return configs


def agreement(report: EvalReport, reference: EvalReport) -> float:
    """Share of prompts whose image this configuration and the reference read identically (all attributes)."""
    same = sum(ours["read"] == theirs["read"] for ours, theirs in zip(report.prompts, reference.prompts))
    return same / len(report.prompts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--work", default="/tmp/diffusiond-eval", help="where the ONNX exports and reports go")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    reports: list[tuple[str, EvalReport]] = []
    for label, settings in configurations(work):
        settings = dataclasses.replace(settings, num_prompts=args.num_prompts)
        report = evaluate(settings)
        log.info("%s: %s", label, report.scores)
        reports.append((label, report))
    reference = reports[0][1]

    lines = [
        f"{reference.num_prompts} held-out prompts, {reference.scheduler}, {reference.steps} steps, guidance "
        f"{reference.guidance_scale:g}, seeds 0..{reference.num_prompts - 1}; "
        f"{platform.processor() or platform.machine()}",
        "",
        "| backend, precision | " + " | ".join(ATTRIBUTES) + " | all four | reads as eager fp32 | s/image |",
        "|---|" + "---:|" * (len(ATTRIBUTES) + 3),
    ]
    for label, report in reports:
        cells = [f"{report.scores[name]:.1%}" for name in (*ATTRIBUTES, "all")]
        cells.append(f"{agreement(report, reference):.1%}")
        cells.append(f"{1 / report.images_per_second:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    sys.stdout.write(table + "\n")
    results = {label: {k: v for k, v in report.as_dict().items() if k != "prompts"} for label, report in reports}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
