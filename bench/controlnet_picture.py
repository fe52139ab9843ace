"""The README's ControlNet picture: per held-out prompt, the scene it names, its canny edges, the built-in
model without the ControlNet and with it (same seed), upscaled 3x.

    python bench/controlnet_picture.py --out docs/controlnet.png
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from diffusiond.models.builtin import builtin_model_dir
from diffusiond.models.canny import canny
from diffusiond.service.control import ControlParams
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/controlnet.png")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling of the 64x64 images")
    args = parser.parse_args()

    model = load_model("builtin", builtin_model_dir())
    rows = []
    for index, scene in enumerate(dataset.held_out_prompts(args.prompts)):
        target = dataset.render(scene, dataset.place(scene, random.Random(index)))
        buffer = io.BytesIO()
        Image.fromarray(target).save(buffer, format="PNG")
        images = []
        for control in (None, ControlParams(controlnet="canny", canny_from=buffer.getvalue())):
            params = GenerationParams(prompt=scene.caption, seed=index, control=control)
            images.append(model.pipeline.generate(resolve(params, model)).images_uint8()[0])
        rows.append(np.concatenate([target, canny(target), *images], axis=1))
        print(f"{scene.caption}: scene | canny | without | with ControlNet")
    save_sheet(rows, Path(args.out), args.scale)


def save_sheet(rows: list[np.ndarray], out: Path, scale: int) -> None:
    """Stack the rows of images into one picture, each pixel ``scale`` x ``scale`` (nearest: crisp pixels)."""
    sheet = np.concatenate(rows, axis=0)
    picture = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
