"""Step caching's quality and speed on the built-in model: PSNR against the exact images and the scorer's accuracy.

    .venv/bin/python bench/step_cache_quality.py [--num-prompts 200] [--intervals 1,2,3,5] [--depths 1,2]

For each cache interval (1 = exact) and depth, ``diffusiond eval`` generates
the held-out prompts (prompt i with seed i, the model's defaults: DPM++ 2M,
20 steps, guidance 4) and scores them; every image is compared with the exact
image of the same prompt and seed (PSNR over 8-bit pixels; identical images
count as 100 dB). Prints a Markdown table for BENCHMARKS.md; ``--json`` keeps
everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusiond.eval.compare import psnr  # noqa: E402
from diffusiond.eval.run import EvalSettings, evaluate  # noqa: E402

IDENTICAL_DB = 100.0


def images(directory: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(directory / f"{i:04d}.png").convert("RGB"), dtype=float) for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--intervals", default="1,2,3,5")
    parser.add_argument("--depths", default="1,2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default="", help="write every figure here")
    args = parser.parse_args()
    intervals = [int(x) for x in args.intervals.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    runs = [(1, 1)] + [(n, d) for n in intervals if n > 1 for d in depths]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exact: list[np.ndarray] = []
        for interval, depth in runs:
            out = Path(tmp) / f"i{interval}-d{depth}"
            settings = EvalSettings(num_prompts=args.num_prompts, batch_size=args.batch_size, save_images=str(out),
                                    cache_interval=interval, cache_depth=depth)
            report = evaluate(settings)
            pictures = images(out, args.num_prompts)
            if interval == 1:
                exact = pictures
            ratios = [psnr(a, b) for a, b in zip(pictures, exact)]
            finite = [r for r in ratios if np.isfinite(r)]
            rows.append({
                "interval": interval, "depth": depth if interval > 1 else "-",
                "psnr_mean_db": float(np.mean([min(r, IDENTICAL_DB) for r in ratios])),
                "psnr_min_db": float(min(finite)) if finite else IDENTICAL_DB,
                "images_per_s": report.images_per_second,
                "scores": report.scores,
            })
            print(f"interval {interval} depth {depth}: {report.images_per_second:.2f} images/s", file=sys.stderr)

    base = rows[0]["images_per_s"]
    attrs = list(rows[0]["scores"])
    print("| interval | depth | PSNR mean / min (dB) | speed vs exact | " + " | ".join(attrs) + " |")
    print("|---|---|---|---|" + "---|" * len(attrs))
    for row in rows:
        scores = " | ".join(f"{row['scores'][a]:.1%}" for a in attrs)
        psnr_text = "exact" if row["interval"] == 1 else f"{row['psnr_mean_db']:.1f} / {row['psnr_min_db']:.1f}"
        print(f"| {row['interval']} | {row['depth']} | {psnr_text} | {row['images_per_s'] / base:.2f}x | {scores} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
