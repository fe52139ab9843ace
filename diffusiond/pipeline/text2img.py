"""The text-to-image loop, written once for every backend and for batches of requests.

The algorithm is diffusers' StableDiffusionPipeline (same tokenization, noise,
scheduler calls and guidance arithmetic, so its images match to float
rounding), generalised to run several requests in one UNet batch:

- every request has its own scheduler instance and its own CPU generators
  (one per image, seeded seed + i), so its noise, and ancestral schedulers'
  per-step noise, do not depend on what else is in the batch;
- every request has its own guidance scale, prompt and negative prompt;
- requests can leave the batch at any step (cancellation, deadline);
- a network call that runs out of device memory is retried in smaller pieces
  (the UNet batch split in halves, a decode image by image) without losing
  the steps already done; a request that does not fit even alone ends with
  ``ResourceExhausted`` and the others go on.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from diffusiond.backends.base import Backend
from diffusiond.errors import ResourceExhausted
from diffusiond.models.config import ModelConfig
from diffusiond.pipeline import previews
from diffusiond.pipeline.memory import is_out_of_memory, release_cached_memory
from diffusiond.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    PreviewKind,
    StartInfo,
    StepInfo,
    Timings,
)
from diffusiond.pipeline.schedulers import SchedulerFactory
from diffusiond.pipeline.text import PromptEncoder

log = logging.getLogger(__name__)


class JobObserver(Protocol):
    """Per-request hooks; the pipeline calls them from its worker thread and they must not block."""

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
    """Batch-wide hooks (metrics); called from the pipeline's thread, must not block."""

    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        """One denoising step of ``requests`` requests holding ``images`` images took ``seconds`` of UNet time."""
        ...

    def on_out_of_memory(self, network: str, rows: int) -> None:
        """A call of ``network`` with ``rows`` batch rows ran out of memory and is retried smaller."""
        ...


class NullBatchObserver:
    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        pass

    def on_out_of_memory(self, network: str, rows: int) -> None:
        pass


@dataclass
class _BatchRun:
    """What one ``run`` learns as it goes: the UNet batch that fits, and whom to tell."""

    observer: BatchObserver
    unet_rows: int | None = None  # most rows per UNet call; None: no limit found yet


@dataclass
class Job:
    request: GenerationRequest
    observer: JobObserver = field(default_factory=NullObserver)


@dataclass
class _Running:
    """A request's state while it is in the denoising loop."""

    job: Job
    scheduler: Any
    generators: list[torch.Generator]
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    step_kwargs: dict[str, Any]
    timings: Timings
    warnings: list[str]
    error: BaseException | None = None
    model_input: torch.Tensor | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.job.request


class Text2ImagePipeline:
    def __init__(
        self, backend: Backend, prompts: PromptEncoder, schedulers: SchedulerFactory, config: ModelConfig
    ) -> None:
        self.backend = backend
        self.prompts = prompts
        self.schedulers = schedulers
        self.config = config

    def generate(self, request: GenerationRequest, observer: JobObserver | None = None) -> GenerationResult:
        """Run one request; raise its stop reason if it was cancelled."""
        (outcome,) = self.run([Job(request, observer or NullObserver())])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run(
        self, jobs: Sequence[Job], observer: BatchObserver | None = None
    ) -> list[GenerationResult | BaseException]:
        """Run compatible requests (equal ``batch_key``) together; one outcome per job, in order.

        A request stopped by its observer gets its stop reason as outcome, one
        that does not fit in memory even alone gets ``ResourceExhausted``; any
        other failure of the backend propagates to the caller.
        """
        if not jobs:
            return []
        keys = {job.request.batch_key() for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs in one batch must share model, size, steps and scheduler; got {keys}")
        run = _BatchRun(observer or NullBatchObserver())
        prepared = [self._prepare_or_fail(job) for job in jobs]
        states = [p for p in prepared if isinstance(p, _Running)]
        self._denoise(states, run)
        return [p if isinstance(p, BaseException) else self._finish(p, run) for p in prepared]

    # -- stages -------------------------------------------------------------

    def _prepare_or_fail(self, job: Job) -> _Running | BaseException:
        try:
            return self._prepare(job)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_cached_memory(self.backend.device)
            return self._does_not_fit(job.request, "encoding its prompts")

    def _does_not_fit(self, request: GenerationRequest, what: str) -> ResourceExhausted:
        log.warning("req=%s: %s ran out of memory even alone", request.request_id, what)
        return ResourceExhausted(
            f"request {request.request_id} does not fit in {self.backend.device} memory: {what} ran out of "
            f"memory even alone ({request.num_images} image(s) of {request.width}x{request.height}); "
            "try fewer images or a smaller size"
        )

    def _prepare(self, job: Job) -> _Running:
        request = job.request
        started = time.perf_counter()
        warnings: list[str] = []
        cond = self._encode(request.prompt, "prompt", warnings)
        uncond = self._encode(request.negative_prompt, "negative_prompt", warnings) if request.uses_guidance else None
        k = request.num_images
        timings = Timings(text_encode_s=time.perf_counter() - started)

        scheduler = self.schedulers.create(request.scheduler)
        scheduler.set_timesteps(request.steps, device=self.backend.device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.image_seeds()]
        shape = (
            1,
            self.config.latent_channels,
            request.height // self.config.vae_scale_factor,
            request.width // self.config.vae_scale_factor,
        )
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        latents = noise.to(self.backend.device) * scheduler.init_noise_sigma

        step_params = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            step_kwargs["generator"] = generators
        return _Running(
            job=job,
            scheduler=scheduler,
            generators=generators,
            latents=latents,
            cond=cond.expand(k, -1, -1),
            uncond=None if uncond is None else uncond.expand(k, -1, -1),
            step_kwargs=step_kwargs,
            timings=timings,
            warnings=warnings,
        )

    def _encode(self, text: str, field_name: str, warnings: list[str]) -> torch.Tensor:
        encoding = self.prompts.encode(text)
        if encoding.truncated_tokens:
            warnings.append(
                f"{field_name} was truncated: {encoding.truncated_tokens} tokens beyond the text "
                f"encoder's limit of {self.config.text_max_length} were ignored"
            )
        return encoding.hidden_states

    def _denoise(self, states: list[_Running], run: _BatchRun) -> None:
        if not states:
            return
        timesteps = states[0].scheduler.timesteps
        total = len(timesteps)
        for state in states:
            state.job.observer.on_started(StartInfo(total_steps=total))
        loop_start = time.perf_counter()
        active = list(states)
        for i, t in enumerate(timesteps):
            active = self._still_running(active)
            if not active:
                break
            unet_start = time.perf_counter()
            outputs = self._unet_batch(active, t, run)
            run.observer.on_denoise_step(
                len(active), sum(s.request.num_images for s in active), time.perf_counter() - unet_start
            )
            for state, rows in zip(active, outputs):
                if rows is None:
                    state.error = self._does_not_fit(state.request, "a UNet batch holding only this request")
                    continue
                k = state.request.num_images
                if state.uncond is not None:
                    uncond, cond = rows[:k], rows[k:]
                    eps = uncond + state.request.guidance_scale * (cond - uncond)
                else:
                    eps = rows
                try:
                    self._step(state, i, total, t, eps, loop_start, run)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    release_cached_memory(self.backend.device)
                    state.error = self._does_not_fit(state.request, "its denoising step or preview")
            active = [state for state in active if state.error is None]
        denoise_s = time.perf_counter() - loop_start
        for state in states:
            state.timings.denoise_s = denoise_s

    def _still_running(self, active: list[_Running]) -> list[_Running]:
        for state in active:
            state.error = state.job.observer.stop_reason()
        return [state for state in active if state.error is None]

    def _unet_batch(self, active: list[_Running], t: torch.Tensor, run: _BatchRun) -> list[torch.Tensor | None]:
        """The UNet output rows of each active request (uncond rows first), None for one that did not fit."""
        samples: list[torch.Tensor] = []
        contexts: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        for state in active:
            start = sum(x.shape[0] for x in samples)
            state.model_input = state.scheduler.scale_model_input(state.latents, t)
            if state.uncond is not None:
                samples += [state.model_input, state.model_input]
                contexts += [state.uncond, state.cond]
            else:
                samples.append(state.model_input)
                contexts.append(state.cond)
            spans.append((start, sum(x.shape[0] for x in samples)))
        sample = torch.cat(samples)
        context = torch.cat(contexts)
        timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=sample.device)
        if run.unet_rows is None:
            try:
                out = self.backend.unet(sample, timestep, context)
                return [out[a:b] for a, b in spans]
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                release_cached_memory(self.backend.device)
                self._shrink(run, sample.shape[0])
        return self._unet_in_pieces(sample, timestep, context, spans, run)

    def _shrink(self, run: _BatchRun, rows: int) -> None:
        run.unet_rows = max(1, (rows + 1) // 2)
        run.observer.on_out_of_memory("unet", rows)
        log.warning("a UNet batch of %d rows ran out of memory; retrying %d rows at a time", rows, run.unet_rows)

    def _unet_in_pieces(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        spans: list[tuple[int, int]],
        run: _BatchRun,
    ) -> list[torch.Tensor | None]:
        """Run the UNet at most ``run.unet_rows`` rows at a time, halving on out-of-memory.

        Each row's output depends only on its own inputs (up to kernel rounding),
        so pieces give the same images; a request whose rows fail one at a time
        does not fit at all.
        """
        n = sample.shape[0]
        rows: list[torch.Tensor | None] = [None] * n
        owner = [index for index, (a, b) in enumerate(spans) for _ in range(a, b)]
        failed: set[int] = set()
        start = 0
        while start < n:
            if owner[start] in failed:
                start += 1
                continue
            size = min(run.unet_rows or n, n - start)
            end = start + size
            try:
                out = self.backend.unet(sample[start:end], timestep[start:end], context[start:end])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                release_cached_memory(self.backend.device)
                if size == 1:
                    failed.add(owner[start])
                    start += 1
                else:
                    self._shrink(run, size)
                continue
            for j in range(size):
                rows[start + j] = out[j : j + 1]
            start = end
        outputs: list[torch.Tensor | None] = []
        for index, (a, b) in enumerate(spans):
            pieces = rows[a:b]
            if index in failed or any(p is None for p in pieces):
                outputs.append(None)
            else:
                outputs.append(torch.cat(pieces))  # type: ignore[arg-type]
        return outputs

    def _decode(self, latents: torch.Tensor, run: _BatchRun) -> torch.Tensor:
        """VAE decode; out of memory with several images -> one image at a time (raises if one alone fails)."""
        try:
            return self.backend.vae_decode(latents)
        except Exception as exc:
            if not is_out_of_memory(exc) or latents.shape[0] == 1:
                raise
            release_cached_memory(self.backend.device)
            run.observer.on_out_of_memory("vae_decode", latents.shape[0])
            return torch.cat([self.backend.vae_decode(latents[i : i + 1]) for i in range(latents.shape[0])])

    def _step(
        self, state: _Running, i: int, total: int, t: torch.Tensor, eps: torch.Tensor, loop_start: float,
        run: _BatchRun,
    ) -> None:
        request = state.request
        step = i + 1
        due = request.preview.due(step, total)
        clean = None
        if due and request.preview.kind in (PreviewKind.APPROX_RGB, PreviewKind.FULL):
            clean = previews.predicted_clean_latent(
                state.scheduler, t, state.model_input, eps, self.config.prediction_type
            )
        state.latents = state.scheduler.step(eps, t, state.latents, **state.step_kwargs, return_dict=False)[0]

        preview: np.ndarray | None = None
        if due:
            if request.preview.kind is PreviewKind.LATENT:
                preview = state.latents.float().cpu().numpy()
            elif request.preview.kind is PreviewKind.APPROX_RGB:
                preview = previews.approx_rgb(clean)
            elif request.preview.kind is PreviewKind.FULL:
                preview = previews.to_uint8_images(self._decode(clean / self.config.scaling_factor, run))
        elapsed = time.perf_counter() - loop_start
        state.job.observer.on_step(
            StepInfo(
                step=step,
                total_steps=total,
                timestep=float(t),
                elapsed_s=elapsed,
                eta_s=elapsed / step * (total - step),
                preview_kind=request.preview.kind if due else PreviewKind.NONE,
                preview=preview,
            )
        )

    def _finish(self, state: _Running, run: _BatchRun) -> GenerationResult | BaseException:
        if state.error is None:
            state.error = state.job.observer.stop_reason()  # no decode for a client that has gone
        if state.error is not None:
            return state.error
        started = time.perf_counter()
        try:
            decoded = self._decode(state.latents / self.config.scaling_factor, run)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_cached_memory(self.backend.device)
            return self._does_not_fit(state.request, "decoding one of its images")
        images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        state.timings.decode_s = time.perf_counter() - started
        state.timings.total_s = state.timings.text_encode_s + state.timings.denoise_s + state.timings.decode_s
        return GenerationResult(
            request=state.request,
            images=images,
            seeds=state.request.image_seeds(),
            timings=state.timings,
            warnings=state.warnings,
        )
