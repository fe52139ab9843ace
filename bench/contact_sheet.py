"""A contact sheet of the built-in model's held-out prompts, with the prompt and the scorer's verdict under each.

    .venv/bin/python bench/contact_sheet.py [--num-prompts 24] [--out docs/builtin-held-out.png]

Prompt i of the held-out test split with seed i and the model's defaults, as
``diffusiond eval`` runs them; each image is shown at 2x with its prompt's
words and, in red, the attributes the scorer read wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusiond.eval.run import EvalSettings, evaluate  # noqa: E402
from diffusiond.eval.scorer import ATTRIBUTES  # noqa: E402

SCALE = 2
COLUMNS = 6
LABEL_HEIGHT = 34


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--out", default="docs/builtin-held-out.png")
    parser.add_argument("--images", default="/tmp/diffusiond-contact-sheet", help="where the eval writes its images")
    args = parser.parse_args()
    report = evaluate(EvalSettings(model=args.model, num_prompts=args.num_prompts, batch_size=12,
                                   save_images=args.images))
    font = ImageFont.load_default()
    cell_w = 64 * SCALE + 8
    cell_h = 64 * SCALE + LABEL_HEIGHT
    rows = -(-len(report.prompts) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for record in report.prompts:
        r, c = divmod(record["index"], COLUMNS)
        x, y = c * cell_w + 4, r * cell_h
        image = Image.open(Path(args.images) / f"{record['index']:04d}.png").convert("RGB")
        sheet.paste(image.resize((64 * SCALE, 64 * SCALE), Image.Resampling.NEAREST), (x, y))
        expected = record["expected"]
        words = [f"{expected['size']} {expected['colour']} {expected['shape']}",
                 f"on {expected['background']}, {expected['position']}"]
        wrong = [name for name in ATTRIBUTES if not record["correct"][name]]
        for line, text in enumerate(words):
            draw.text((x, y + 64 * SCALE + 2 + 11 * line), text, fill=(0, 0, 0), font=font)
        if wrong:
            draw.text((x, y + 64 * SCALE + 24), "wrong: " + ", ".join(wrong), fill=(200, 0, 0), font=font)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    scores = report.scores
    print(f"{args.out}: {len(report.prompts)} prompts; " + ", ".join(f"{k} {scores[k]:.0%}" for k in (*ATTRIBUTES, "all")))
    print(f"mean over the sheet: {np.mean([all(p['correct'].values()) for p in report.prompts]):.0%} fully right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
