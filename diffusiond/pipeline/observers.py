"""Hooks through which the pipeline reports progress, per request and per batch.

The pipeline calls them from the thread that runs it; they must not block
(the batcher forwards events to the event loop without waiting).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from diffusiond.pipeline.request import StartInfo, StepInfo


class JobObserver(Protocol):
    """Per-request hooks."""

    def stop_reason(self) -> BaseException | None:
        """An exception to end this request with (cancelled, deadline passed), or None to go on."""
        ...

    def on_started(self, info: StartInfo) -> None: ...

    def on_step(self, info: StepInfo) -> None: ...


class NullObserver:
    def stop_reason(self) -> BaseException | None:
        return None

    def on_started(self, info: StartInfo) -> None:
        pass

    def on_step(self, info: StepInfo) -> None:
        pass


class LastLatentsObserver(NullObserver):
    """Keeps the last LATENT preview it sees: with previews every N >= steps, the final latents."""

    def __init__(self) -> None:
        self.latents: np.ndarray | None = None

    def on_step(self, info: StepInfo) -> None:
        if info.preview is not None:
            self.latents = info.preview


class BatchObserver(Protocol):
    """Hooks about the shared work (metrics)."""

    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        """One denoising step of ``requests`` requests holding ``images`` images took ``seconds`` of UNet time."""
        ...

    def on_out_of_memory(self, network: str, rows: int) -> None:
        """A call of ``network`` with ``rows`` batch rows ran out of memory and is retried smaller."""
        ...

    def on_images_filtered(self, images: int) -> None:
        """The safety checker withheld ``images`` finished images."""
        ...


class NullBatchObserver:
    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        pass

    def on_out_of_memory(self, network: str, rows: int) -> None:
        pass

    def on_images_filtered(self, images: int) -> None:
        pass
