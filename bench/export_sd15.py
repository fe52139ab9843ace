"""Export the architecture-true SD 1.5 model (3.4 GB fp32 UNet) to ONNX with external data, and load it back.

    .venv/bin/python bench/export_sd15.py [--work artifacts/sd15-export]

Creates the ``sd15`` preset (real SD 1.5 configs, seeded random weights) if
absent, exports it (fp32; the UNet goes past protobuf's 2 GB limit, so its
weights go to ``unet/model.onnx_data``), which verifies every network in ONNX
Runtime against PyTorch, then loads the export on the onnxruntime backend and
runs one UNet step. Prints times and file sizes as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "sd15-export"))
    parser.add_argument("--force", action="store_true", help="re-export even when up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from diffusiond.export.onnx_export import ExportOptions, export_onnx
    from diffusiond.models.descriptors import ShapeProfile
    from diffusiond.models.synthetic import write_sd_model
    from diffusiond.service.models import load_model

    work = Path(args.work)
    source, out = work / "sd15", work / "sd15-onnx"
    started = time.perf_counter()
    if not (source / "model_index.json").is_file():
        write_sd_model(source, "sd15")
    create_s = time.perf_counter() - started

    started = time.perf_counter()
    result = export_onnx(source, out, ExportOptions(precision="fp32", force=args.force, profile=ShapeProfile.around(512)))
    export_s = time.perf_counter() - started

    started = time.perf_counter()
    model = load_model("sd15", out, "onnxruntime")
    load_s = time.perf_counter() - started
    sample = torch.randn(2, 4, 32, 32)
    started = time.perf_counter()
    out_sample = model.backend.unet(sample, torch.full((2,), 500.0), torch.randn(2, 77, 768))
    step_s = time.perf_counter() - started
    assert out_sample.shape == (2, 4, 32, 32) and torch.isfinite(out_sample).all()

    files = {}
    for entry in result.manifest.components.values():
        for rel in entry.files:
            files[rel] = (out / rel).stat().st_size
    report = {
        "create_model_s": round(create_s, 1),
        "export_s": round(export_s, 1),
        "reused": result.reused,
        "stage_s": result.manifest.timings_s,
        "load_onnxruntime_s": round(load_s, 1),
        "unet_step_batch2_256px_s": round(step_s, 2),
        "files": files,
        "verification": {n: e.tested for n, e in result.manifest.components.items()},
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print("| file | bytes | MB |\n|---|---:|---:|")
    for rel, size in files.items():
        print(f"| {rel} | {size} | {size / 1e6:.1f} |")
    print(f"\nexport {export_s:.1f} s (stages: {result.manifest.timings_s}); "
          f"load on onnxruntime {load_s:.1f} s; one UNet call (batch 2, 256x256) {step_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
