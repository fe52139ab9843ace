"""How much a preview looks like the image: the last step's preview against the final image.

The last step's preview shows the predicted clean latent of the last step, so a
faithful preview kind differs from the result only by what it approximates
(the decoder). The final image is box-filtered down to the preview's own size
(APPROX_RGB: one pixel per latent pixel) and compared in 8-bit levels: PSNR and
mean absolute error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffusiond.eval.compare import psnr
from diffusiond.models.latent_rgb import LatentRGB
from diffusiond.pipeline.observers import NullObserver
from diffusiond.pipeline.request import PreviewKind, StepInfo
from diffusiond.service.models import LoadedModel
from diffusiond.service.resolver import GenerationParams, PreviewParams, resolve


@dataclass(frozen=True)
class PreviewFidelity:
    prompt: str
    seed: int
    psnr_db: float
    mean_abs_error: float  # 8-bit levels, averaged over pixels and channels
    preview_size: tuple[int, int]  # (width, height)


class _LastPreview(NullObserver):
    def __init__(self) -> None:
        self.preview: np.ndarray | None = None

    def on_step(self, info: StepInfo) -> None:
        if info.preview is not None:
            self.preview = info.preview


def downscale(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3], each pixel the mean of its patch (box filter)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))


def measure(
    model: LoadedModel, prompts: Sequence[str], seeds: Sequence[int], kind: PreviewKind = PreviewKind.APPROX_RGB,
    steps: int = 0,
) -> list[PreviewFidelity]:
    """The last step's ``kind`` preview against the final image, for each (prompt, seed)."""
    results = []
    for prompt, seed in zip(prompts, seeds):
        observer = _LastPreview()
        final = model.pipeline.generate(_last_preview_request(model, prompt, seed, kind, steps), observer)
        if observer.preview is None:
            raise RuntimeError(f"no {kind.value} preview came with the last step")
        results.append(_fidelity(prompt, seed, observer.preview[0], final.images_uint8()[0]))
    return results


def compare_projections(
    model: LoadedModel, prompts: Sequence[str], seeds: Sequence[int], projections: Mapping[str, LatentRGB],
    steps: int = 0,
) -> dict[str, list[PreviewFidelity]]:
    """Like ``measure`` for APPROX_RGB, for several projections at the cost of one generation per prompt:
    the last step's predicted clean latents go through each projection, against the same final image."""
    own = model.pipeline.latent_rgb
    recorder = _Recording(own)
    model.pipeline.latent_rgb = recorder  # type: ignore[assignment]  # projects as ``own`` does, and keeps the input
    results: dict[str, list[PreviewFidelity]] = {name: [] for name in projections}
    try:
        for prompt, seed in zip(prompts, seeds):
            recorder.latents = None
            request = _last_preview_request(model, prompt, seed, PreviewKind.APPROX_RGB, steps)
            final = model.pipeline.generate(request, NullObserver()).images_uint8()[0]
            if recorder.latents is None:
                raise RuntimeError("no APPROX_RGB preview came with the last step")
            for name, projection in projections.items():
                results[name].append(_fidelity(prompt, seed, projection.project(recorder.latents[:1])[0], final))
    finally:
        model.pipeline.latent_rgb = own
    return results


class _Recording:
    """Stands in for a model's projection: projects as ``inner`` does and keeps the latents it was given."""

    def __init__(self, inner: LatentRGB) -> None:
        self.inner = inner
        self.channels = inner.channels
        self.source = inner.source
        self.latents: torch.Tensor | None = None

    def project(self, latents: torch.Tensor) -> np.ndarray:
        self.latents = latents.detach().float().cpu().clone()
        return self.inner.project(latents)


def _last_preview_request(model: LoadedModel, prompt: str, seed: int, kind: PreviewKind, steps: int):
    params = GenerationParams(prompt=prompt, seed=seed, steps=steps, request_id=f"preview-{seed}",
                              preview=PreviewParams(kind, every_n_steps=model.limits.max_steps))  # the last only
    return resolve(params, model)


def _fidelity(prompt: str, seed: int, preview: np.ndarray, final: np.ndarray) -> PreviewFidelity:
    height, width = preview.shape[:2]
    target = downscale(final, width, height)
    error = float(np.abs(preview.astype(np.float64) - target).mean())
    return PreviewFidelity(prompt, seed, psnr(preview, target), error, (width, height))
