"""How strongly a style adapter shows: the pixel scorer's style detector on held-out prompts, per scale.

    python -m diffusiond.eval.lora_style [--lora-dir builtin] [--adapter framed] [--prompts 100] \\
        [--scales 0,0.4,0.8,1.0] [--json out.json]

Held-out prompt *i* (``dataset.held_out_prompts``) runs with seed *i* at every
scale, through the same loader, resolver and pipeline as the server, so the
only difference between scales is the adapter. Reported per scale: how often
``scorer.read_style`` sees the style, and the mean frame contrast (the
detector's raw measure, which grows with the scale when the adapter works).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffusiond.eval.scorer import frame_contrast, read_style
from diffusiond.service.models import LoadedModel
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.0, 0.4, 0.8, 1.0)


@dataclass(frozen=True)
class StyleReport:
    scale: float
    prompts: int
    detected: int
    mean_contrast: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.detected / self.prompts if self.prompts else 0.0


def style_images(model: LoadedModel, adapter: str, scale: float, prompts: int, batch: int = 25) -> list[np.ndarray]:
    """uint8 images of the first ``prompts`` held-out prompts (prompt i with seed i) at ``scale``."""
    scenes = dataset.held_out_prompts(prompts)
    images: list[np.ndarray] = []
    for start in range(0, len(scenes), batch):
        requests = [
            resolve(GenerationParams(prompt=scene.caption, seed=start + i, loras=((adapter, scale),),
                                     request_id=f"style-{scale:g}-{start + i}"), model)
            for i, scene in enumerate(scenes[start:start + batch])
        ]
        for outcome in model.pipeline.generate_together(requests):
            if isinstance(outcome, BaseException):
                raise outcome
            images.append(outcome.images_uint8()[0])
    return images


def measure(model: LoadedModel, adapter: str, scales=DEFAULT_SCALES, prompts: int = 100,
            style: str = "framed") -> list[StyleReport]:
    reports = []
    for scale in scales:
        started = time.perf_counter()
        images = style_images(model, adapter, scale, prompts)
        detected = sum(read_style(image) == style for image in images)
        contrast = float(np.mean([frame_contrast(image) for image in images]))
        reports.append(StyleReport(scale, len(images), detected, round(contrast, 2),
                                   round(time.perf_counter() - started, 2)))
        log.info("scale %.2f: %s in %d of %d held-out prompts (mean frame contrast %.1f)", scale, style, detected,
                 len(images), contrast)
    return reports


def main(argv: list[str] | None = None) -> int:
    from diffusiond.models.builtin import BUILTIN_DIR, BUILTIN_NAME
    from diffusiond.service.adapters import AdapterLibrary, resolve_lora_dir
    from diffusiond.service.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora-dir", default="builtin", help="adapter directory ('builtin': the shipped ones)")
    parser.add_argument("--adapter", default="framed")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES))
    parser.add_argument("--json", default="", help="write the reports here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    library = AdapterLibrary(resolve_lora_dir(args.lora_dir))
    model = load_model(BUILTIN_NAME, BUILTIN_DIR, lora_library=library)
    reports = measure(model, args.adapter, tuple(float(s) for s in args.scales.split(",")), args.prompts)
    rows = [{**asdict(r), "rate": round(r.rate, 4)} for r in reports]
    for row in rows:
        sys.stdout.write(f"scale {row['scale']:>4g}: {row['rate']:.0%} framed ({row['detected']}/{row['prompts']}), "
                         f"mean frame contrast {row['mean_contrast']:.1f}, {row['seconds']:.1f}s\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"adapter": args.adapter, "reports": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
