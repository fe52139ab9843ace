"""``diffusiond eval``: generate the held-out prompts on a backend and precision, and score them.

Runs in-process (no server): the model is loaded with the same
``load_model`` the server uses and driven through the same pipeline, so a
backend or an exported precision is judged exactly as it would serve. Prompt
*i* uses seed ``seed + i``; requests run ``batch_size`` at a time (one UNet
batch), which changes pixels only by float rounding.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusiond.backends.base import BackendSettings
from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.eval.scorer import ATTRIBUTES, Scores, read_image
from diffusiond.service.control import ControlParams
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset

log = logging.getLogger(__name__)

# The built-in model's quality targets (eager fp32, held-out prompts); the report marks each met or missed.
TARGETS = {"colour": 0.95, "background": 0.98, "shape": 0.85, "position": 0.80, "size": 0.95}


@dataclass(frozen=True)
class EvalSettings:
    model: str = "builtin"  # "builtin", a model directory, or NAME=PATH
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "fp32"
    precision: str = ""  # what the backend must report it computes in (e.g. int8); empty: any
    num_prompts: int = 200
    split: str = "test"  # "test": held out from training; "validation": for choosing defaults
    steps: int = 0  # 0: the model's default
    guidance_scale: float | None = None  # None: the model's default
    scheduler: str = ""  # empty: the model's default
    seed: int = 0
    batch_size: int = 16
    clip_model: str = ""  # a local CLIP model directory, for CLIP score
    save_images: str = ""  # a directory for the generated images and a contact sheet
    cache_interval: int = 1  # step caching (1: off, exact)
    cache_depth: int = 1
    fid: bool = False  # also FID against ``reference`` (and Inception Score, with ``inception_weights``)
    inception_weights: str = ""  # a local TorchScript Inception-v3 (eval.fidelity); empty: the stand-in
    reference: str = ""  # a directory of reference images; empty: real renders of the same scenes
    # A ControlNet attached to the model (the built-in model's: "canny"): prompt i is conditioned on the
    # canny edges (computed by the server's own ``canny_from`` path) of its scene drawn with seed + i.
    controlnet: str = ""
    control_scale: float = 1.0


@dataclass
class EvalReport:
    settings: dict[str, Any]
    model: str
    backend: str
    precision: str
    device: str
    scheduler: str
    steps: int
    guidance_scale: float
    num_prompts: int
    scores: dict[str, float]
    clip_score: float | None
    fidelity: dict[str, Any] | None  # FID (and IS), with the feature network and image counts
    seconds: float
    images_per_second: float
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))
    prompts: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        split = self.settings.get("split")
        which = "held-out" if split == "test" else split
        head = (f"{self.model} on {self.backend} ({self.precision}, {self.device}), {self.scheduler}, "
                f"{self.steps} steps, guidance {self.guidance_scale:g}, {self.num_prompts} {which} prompts")
        lines = [head, f"{'attribute':<12}{'accuracy':>10}{'target':>9}"]
        for name in (*ATTRIBUTES, "all"):
            target = TARGETS.get(name)
            mark = "" if target is None else ("  ok" if self.scores[name] >= target else "  MISSED")
            lines.append(f"{name:<12}{self.scores[name]:>10.1%}{'' if target is None else f'{target:>9.0%}'}{mark}")
        if self.clip_score is not None:
            lines.append(f"{'clip score':<12}{self.clip_score:>10.2f}")
        if self.fidelity is not None:
            lines.append(f"{'FID':<12}{self.fidelity['fid']:>10.2f}  ({self.fidelity['features']}; "
                         f"{self.fidelity['generated']} vs {self.fidelity['reference']} images)")
            if self.fidelity["inception_score"] is not None:
                lines.append(f"{'IS':<12}{self.fidelity['inception_score']:>10.2f}  "
                             f"(+/- {self.fidelity['inception_score_std']:.2f})")
        lines.append(f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s)")
        return "\n".join(lines)


def backend_settings(settings: EvalSettings) -> BackendSettings:
    return BackendSettings(device=settings.device, dtype=settings.dtype)


def evaluate(settings: EvalSettings, progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Load the model, generate and score ``num_prompts`` prompts of the chosen split."""
    from diffusiond.models.sources import ModelSource, resolve_model_dir

    if settings.batch_size < 1:
        raise InvalidArgument("batch_size", f"must be at least 1, got {settings.batch_size}")
    scenes = _scenes(settings)
    source = ModelSource.parse(settings.model)
    model_dir = resolve_model_dir(source.location)
    model = load_model(source.name, model_dir, settings.backend, backend_settings(settings))
    try:
        if settings.precision and model.backend.dtype_name != settings.precision:
            raise FailedPrecondition(
                f"{settings.model} on {settings.backend} computes in {model.backend.dtype_name}, "
                f"not {settings.precision}"
            )
        return _run(settings, model, scenes, progress)
    finally:
        model.backend.close()


def _scenes(settings: EvalSettings) -> list[dataset.Scene]:
    try:
        scenes = list(dataset.split(settings.split))
    except ValueError as exc:
        raise InvalidArgument("split", str(exc)) from None
    if not 1 <= settings.num_prompts <= len(scenes):
        raise InvalidArgument("num_prompts", f"must be between 1 and {len(scenes)}, got {settings.num_prompts}")
    return scenes[: settings.num_prompts]


def _run(settings: EvalSettings, model, scenes: list[dataset.Scene],
         progress: Callable[[int, int], None] | None) -> EvalReport:
    def params(index: int, scene: dataset.Scene) -> GenerationParams:
        return GenerationParams(
            request_id=f"eval-{index}", prompt=scene.caption, steps=settings.steps,
            guidance_scale=settings.guidance_scale, seed=settings.seed + index, scheduler=settings.scheduler,
            cache_interval=settings.cache_interval, cache_depth=settings.cache_depth,
            control=_control(settings, index, scene),
        )

    first_request = resolve(params(0, scenes[0]), model)  # what every prompt runs with, checked once
    steps, guidance, scheduler = first_request.steps, first_request.guidance_scale, first_request.scheduler

    clip = None
    if settings.clip_model:
        from diffusiond.eval.clip_score import ClipScorer

        clip = ClipScorer(settings.clip_model)
    image_dir = Path(settings.save_images) if settings.save_images else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    verdicts: list[dict[str, bool]] = []
    images: list[np.ndarray] = []
    clip_scores: list[float] = []
    started = time.perf_counter()
    for first in range(0, len(scenes), settings.batch_size):
        chunk = scenes[first : first + settings.batch_size]
        requests = [resolve(params(first + i, scene), model) for i, scene in enumerate(chunk)]
        outcomes = model.pipeline.generate_together(requests)
        batch_images = []
        for i, (scene, outcome) in enumerate(zip(chunk, outcomes)):
            if isinstance(outcome, BaseException):
                raise outcome
            image = outcome.images_uint8()[0]
            batch_images.append(image)
            reading = read_image(image)
            verdict = reading.matches(scene)
            verdicts.append(verdict)
            records.append({
                "index": first + i, "prompt": scene.caption, "seed": settings.seed + first + i,
                "expected": scene.as_dict(), "read": asdict(reading), "correct": verdict,
            })
            if image_dir is not None:
                _save_png(image, image_dir / f"{first + i:04d}.png")
        if clip is not None:
            scores = clip.scores(batch_images, [scene.caption for scene in chunk])
            clip_scores += scores
            for record, score in zip(records[-len(chunk):], scores):
                record["clip_score"] = round(score, 3)
        images += batch_images
        if progress is not None:
            progress(len(records), len(scenes))
    seconds = time.perf_counter() - started
    if image_dir is not None:
        _save_png(_contact_sheet(images), image_dir / "sheet.png")
    wants_fid = settings.fid or bool(settings.inception_weights or settings.reference)
    fidelity = _fidelity(settings, scenes, images) if wants_fid else None

    return EvalReport(
        settings=asdict(settings),
        model=model.name,
        backend=model.backend.name,
        precision=model.backend.dtype_name,
        device=str(model.backend.device),
        scheduler=scheduler,
        steps=steps,
        guidance_scale=guidance,
        num_prompts=len(scenes),
        scores=Scores.tally(verdicts).as_dict(),
        clip_score=None if clip is None else round(float(np.mean(clip_scores)), 3),
        fidelity=None if fidelity is None else asdict(fidelity),
        seconds=round(seconds, 2),
        images_per_second=round(len(scenes) / seconds, 3),
        prompts=records,
    )


def _fidelity(settings: EvalSettings, scenes: list[dataset.Scene], images: list[np.ndarray]):
    """FID (and IS) of the generated images against the reference set: a directory, else real renders of
    the same scenes (prompt i's scene drawn with placement seed ``seed + i``)."""
    from diffusiond.eval import fidelity
    from diffusiond.models.builtin import ensure_builtin_model

    size = images[0].shape[0]
    if settings.reference:
        reference = fidelity.load_reference(Path(settings.reference), size)
    else:
        if size != dataset.IMAGE_SIZE:
            raise InvalidArgument("reference", f"the shapes data set's renders are {dataset.IMAGE_SIZE} px and the "
                                  f"images {size} px; give --reference DIR")
        reference = [dataset.render(scene, dataset.place(scene, random.Random(settings.seed + i)))
                     for i, scene in enumerate(scenes)]
    if settings.inception_weights:
        network = fidelity.FeatureNetwork.from_file(Path(settings.inception_weights))
    else:
        network = fidelity.FeatureNetwork.stand_in(ensure_builtin_model(), size)
    return fidelity.score(images, reference, network)


def _control(settings: EvalSettings, index: int, scene: dataset.Scene) -> ControlParams | None:
    """The scene drawn where its seeded placement puts it, sent as ``canny_from`` (None: no ControlNet)."""
    if not settings.controlnet:
        return None
    import io
    import random

    from PIL import Image

    target = dataset.render(scene, dataset.place(scene, random.Random(settings.seed + index)))
    buffer = io.BytesIO()
    Image.fromarray(target).save(buffer, format="PNG")
    return ControlParams(controlnet=settings.controlnet, canny_from=buffer.getvalue(), scale=settings.control_scale)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def _contact_sheet(images: list[np.ndarray], columns: int = 16) -> np.ndarray:
    height, width, _ = images[0].shape
    rows = -(-len(images) // columns)
    sheet = np.full((rows * height, columns * width, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return sheet


def write_report(report: EvalReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
