"""The README's Adapters picture: per held-out prompt, the built-in model alone, with its LoRA adapter
(``framed``) at 0.8, the canny edges of the prompt's scene, and the model guided by its ControlNet on
those edges; same seed in every column, upscaled 3x.

    python bench/adapters_picture.py --out docs/adapters.png
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
from controlnet_picture import save_sheet  # bench/, the script's own directory
from PIL import Image

from diffusiond.models.builtin import BUILTIN_ADAPTERS_DIR, builtin_model_dir
from diffusiond.models.canny import canny
from diffusiond.service.adapters import AdapterLibrary
from diffusiond.service.control import ControlParams
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset

COLUMNS = "base | LoRA framed 0.8 | the scene's canny edges | ControlNet-guided"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/adapters.png")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--lora-scale", type=float, default=0.8)
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling of the 64x64 images")
    args = parser.parse_args()

    model = load_model("builtin", builtin_model_dir(), lora_library=AdapterLibrary(BUILTIN_ADAPTERS_DIR))
    rows = []
    for index, scene in enumerate(dataset.held_out_prompts(args.prompts)):
        target = dataset.render(scene, dataset.place(scene, random.Random(index)))
        buffer = io.BytesIO()
        Image.fromarray(target).save(buffer, format="PNG")
        variants = [
            GenerationParams(prompt=scene.caption, seed=index),
            GenerationParams(prompt=scene.caption, seed=index, loras=(("framed", args.lora_scale),)),
            GenerationParams(prompt=scene.caption, seed=index,
                             control=ControlParams(controlnet="canny", canny_from=buffer.getvalue())),
        ]
        base, lora, controlled = (model.pipeline.generate(resolve(p, model)).images_uint8()[0] for p in variants)
        edges = canny(target)
        if edges.ndim == 2:
            edges = np.repeat(edges[..., None], 3, axis=2)
        rows.append(np.concatenate([base, lora, edges, controlled], axis=1))
        print(f"{scene.caption}: {COLUMNS}")
    save_sheet(rows, Path(args.out), args.scale)


if __name__ == "__main__":
    main()
