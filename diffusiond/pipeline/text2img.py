"""The text-to-image loop, written once for every backend and for batches of requests.

The algorithm is diffusers' StableDiffusionPipeline (same tokenization, noise,
scheduler calls and guidance arithmetic, so its images match to float
rounding), generalised to run several requests in one UNet batch:

- every request has its own scheduler instance and its own CPU generators
  (one per image, seeded seed + i), so its noise, and ancestral schedulers'
  per-step noise, do not depend on what else is in the batch;
- every request has its own guidance scale, prompt and negative prompt;
- requests can leave the batch at any step (cancellation, deadline).
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
from diffusiond.models.config import ModelConfig
from diffusiond.pipeline import previews
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

    def run(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]:
        """Run compatible requests (equal ``batch_key``) together; one outcome per job, in order.

        A request stopped by its observer gets its stop reason as outcome; a
        failure of the backend itself propagates to the caller, which owns
        retry policy (e.g. splitting a batch that ran out of memory).
        """
        if not jobs:
            return []
        keys = {job.request.batch_key() for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs in one batch must share model, size, steps and scheduler; got {keys}")
        states = [self._prepare(job) for job in jobs]
        self._denoise(states)
        return [self._finish(state) for state in states]

    # -- stages -------------------------------------------------------------

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

    def _denoise(self, states: list[_Running]) -> None:
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
            noise_pred = self._unet_batch(active, t)
            offset = 0
            for state in active:
                k = state.request.num_images
                if state.uncond is not None:
                    uncond, cond = noise_pred[offset : offset + k], noise_pred[offset + k : offset + 2 * k]
                    offset += 2 * k
                    eps = uncond + state.request.guidance_scale * (cond - uncond)
                else:
                    eps = noise_pred[offset : offset + k]
                    offset += k
                self._step(state, i, total, t, eps, loop_start)
        denoise_s = time.perf_counter() - loop_start
        for state in states:
            state.timings.denoise_s = denoise_s

    def _still_running(self, active: list[_Running]) -> list[_Running]:
        for state in active:
            state.error = state.job.observer.stop_reason()
        return [state for state in active if state.error is None]

    def _unet_batch(self, active: list[_Running], t: torch.Tensor) -> torch.Tensor:
        samples: list[torch.Tensor] = []
        contexts: list[torch.Tensor] = []
        for state in active:
            state.model_input = state.scheduler.scale_model_input(state.latents, t)
            if state.uncond is not None:
                samples += [state.model_input, state.model_input]
                contexts += [state.uncond, state.cond]
            else:
                samples.append(state.model_input)
                contexts.append(state.cond)
        sample = torch.cat(samples)
        timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=sample.device)
        return self.backend.unet(sample, timestep, torch.cat(contexts))

    def _step(
        self, state: _Running, i: int, total: int, t: torch.Tensor, eps: torch.Tensor, loop_start: float
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
                preview = previews.to_uint8_images(self.backend.vae_decode(clean / self.config.scaling_factor))
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

    def _finish(self, state: _Running) -> GenerationResult | BaseException:
        if state.error is None:
            state.error = state.job.observer.stop_reason()  # no decode for a client that has gone
        if state.error is not None:
            return state.error
        started = time.perf_counter()
        decoded = self.backend.vae_decode(state.latents / self.config.scaling_factor)
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
