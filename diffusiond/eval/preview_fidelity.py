"""How much a preview looks like the image: the last step's preview against the final image.

The last step's preview shows the predicted clean latent of the last step, so a
faithful preview kind differs from the result only by what it approximates
(the decoder). The final image is box-filtered down to the preview's own size
(APPROX_RGB: one pixel per latent pixel) and compared in 8-bit levels: PSNR and
mean absolute error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffusiond.eval.compare import psnr
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
        params = GenerationParams(prompt=prompt, seed=seed, steps=steps, request_id=f"preview-{seed}",
                                  preview=PreviewParams(kind, every_n_steps=model.limits.max_steps))  # the last only
        request = resolve(params, model)
        observer = _LastPreview()
        result = model.pipeline.generate(request, observer)
        if observer.preview is None:
            raise RuntimeError(f"no {kind.value} preview came with the last step")
        preview = observer.preview[0]
        final = result.images_uint8()[0]
        height, width = preview.shape[:2]
        target = downscale(final, width, height)
        error = float(np.abs(preview.astype(np.float64) - target).mean())
        results.append(PreviewFidelity(prompt, seed, psnr(preview, target), error, (width, height)))
    return results
