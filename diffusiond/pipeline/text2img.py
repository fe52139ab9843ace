"""Text to image, one step at a time, for any number of requests at once.

The algorithm is diffusers' StableDiffusionPipeline (same tokenization, noise,
scheduler calls and guidance arithmetic, so its images match to float
rounding), cut into stages so that a batcher can interleave requests:

    state = pipeline.prepare(request)   # encode prompts, set timesteps, seeded noise
    while not state.done:
        pipeline.step([state, ...])     # one UNet call for every state given
    result = pipeline.finish(state)     # decode

``step`` takes any states whose latents have one shape: every row carries its
own timestep, rows with and without classifier-free guidance share the call,
and every state keeps its own scheduler, generators (seed + i per image),
guidance scale and preview plan. So states may join and leave between any two
steps, and a request's image does not depend on its company beyond kernel
rounding. A UNet call or decode that runs out of memory is retried in smaller
pieces by ``RowRunner``; only a request that does not fit even alone fails.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusiond.backends.base import Backend, CachesDeepFeatures, ControlRows, CrossAttentionKV, RunsControlNets
from diffusiond.errors import OutOfMemory, ResourceExhausted
from diffusiond.models.config import ModelConfig
from diffusiond.pipeline import previews
from diffusiond.pipeline.memory import RowRunner, release_cached_memory
from diffusiond.pipeline.observers import BatchObserver, JobObserver, NullBatchObserver, NullObserver
from diffusiond.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    PreviewKind,
    StartInfo,
    StepInfo,
    Timings,
)
from diffusiond.pipeline.safety import SafetyChecker
from diffusiond.pipeline.schedulers import SchedulerFactory
from diffusiond.pipeline.text import PromptEncoder

log = logging.getLogger(__name__)

Context = torch.Tensor | CrossAttentionKV


@dataclass
class RequestState:
    """One request between ``prepare`` and ``finish``: everything its next step needs."""

    request: GenerationRequest
    observer: JobObserver
    scheduler: Any  # its own instance: multistep schedulers keep history
    generators: list[torch.Generator]  # one per image, seeded seed + i
    step_kwargs: dict[str, Any]  # eta / generator, for schedulers that take them
    cond: Context  # [k, T, D] prompt encoding (or its cross-attention keys and values)
    uncond: Context | None  # the negative prompt's; None without guidance
    latents: torch.Tensor  # [k, C, h, w] on the backend's device
    timings: Timings
    warnings: list[str]
    steps_done: int = 0
    started_at: float | None = None  # perf_counter() at its first step
    model_input: torch.Tensor | None = None  # the scaled latents of the step in progress
    deep: torch.Tensor | None = None  # step caching: the UNet's deep features from its latest full pass
    error: BaseException | None = None  # set when it stops early; finish raises it
    control_image: torch.Tensor | None = None  # [k, 3, H, W] in [0, 1]: its ControlNet's image, once per image

    @property
    def controlnet(self) -> str:
        return self.request.controlnet

    def control_scale(self) -> float:
        """The conditioning scale of the step in progress (0 outside the request's guidance window)."""
        control = self.request.control
        return 0.0 if control is None else control.scale_at(self.steps_done, self.total_steps)

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    @property
    def active(self) -> bool:
        return self.error is None and not self.done

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.steps_done]

    @property
    def rows(self) -> int:
        """UNet rows per step: one per image, two with guidance."""
        return self.request.num_images * (1 if self.uncond is None else 2)

    @property
    def unet_pass(self) -> UNetPass:
        """Which UNet pass this step takes: step caching reuses deep features between full passes."""
        request = self.request
        if not request.caches_steps:
            return UNetPass(PLAIN, 0)
        if self.deep is None or self.steps_done % request.cache_interval == 0:
            return UNetPass(FULL, request.cache_depth)
        return UNetPass(SHALLOW, request.cache_depth)


PLAIN, FULL, SHALLOW = "plain", "full", "shallow"


@dataclass(frozen=True)
class UNetPass:
    kind: str  # PLAIN: the whole UNet; FULL: the whole UNet, keeping its deep features; SHALLOW: reusing them
    depth: int  # up blocks the shallow pass runs (FULL, SHALLOW)


class Text2ImagePipeline:
    def __init__(
        self,
        backend: Backend,
        prompts: PromptEncoder,
        schedulers: SchedulerFactory,
        config: ModelConfig,
        safety: SafetyChecker | None = None,
    ) -> None:
        self.backend = backend
        self.prompts = prompts
        self.schedulers = schedulers
        self.config = config
        self.safety = safety  # when set, every image and preview image handed out is checked
        self._unet_rows = RowRunner("unet", backend.device)
        self._decode_rows = RowRunner("vae_decode", backend.device)

    # -- whole requests -------------------------------------------------------------

    def generate(self, request: GenerationRequest, observer: JobObserver | None = None) -> GenerationResult:
        """Run one request from start to end; raise its stop reason if it was stopped."""
        (outcome,) = self.generate_together([request], [observer or NullObserver()])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def denoise(self, request: GenerationRequest, observer: JobObserver | None = None) -> RequestState:
        """Prepare and take every step, without decoding (calibration needs only the UNet's inputs)."""
        state = self.prepare(request, observer)
        while state.active:
            self.step([state])
        return state

    def generate_together(
        self,
        requests: Sequence[GenerationRequest],
        observers: Sequence[JobObserver] | None = None,
        batch_observer: BatchObserver | None = None,
    ) -> list[GenerationResult | BaseException]:
        """Run requests of one latent shape side by side; one outcome per request, in order.

        An outcome is an exception when its request was stopped by its observer
        or does not fit in memory even alone; any other failure propagates.
        """
        observers = observers or [NullObserver() for _ in requests]
        try:
            return self._generate_together(requests, observers, batch_observer)
        finally:
            self.forget_row_limits()

    def _generate_together(
        self,
        requests: Sequence[GenerationRequest],
        observers: Sequence[JobObserver],
        batch_observer: BatchObserver | None,
    ) -> list[GenerationResult | BaseException]:
        outcomes: list[GenerationResult | BaseException | None] = [None] * len(requests)
        states: list[tuple[int, RequestState]] = []
        for index, (request, observer) in enumerate(zip(requests, observers)):
            try:
                states.append((index, self.prepare(request, observer)))
            except ResourceExhausted as exc:
                outcomes[index] = exc
        while any(state.active for _, state in states):
            self.step([state for _, state in states], batch_observer)
        for index, state in states:
            try:
                outcomes[index] = self.finish(state, batch_observer)
            except Exception as exc:
                if exc is not state.error:
                    raise
                outcomes[index] = exc
        return outcomes  # type: ignore[return-value]

    def forget_row_limits(self) -> None:
        """Forget how many rows fitted after running out of memory (call when the work has drained)."""
        self._unet_rows.forget()
        self._decode_rows.forget()

    # -- stage 1: prepare ---------------------------------------------------------------

    def prepare(self, request: GenerationRequest, observer: JobObserver | None = None) -> RequestState:
        """Encode the prompts, set the timesteps and draw the seeded noise."""
        observer = observer or NullObserver()
        started = time.perf_counter()
        warnings: list[str] = []
        k = request.num_images
        try:
            cond = self._encode(request.prompt, "prompt", warnings)
            uncond = (
                self._encode(request.negative_prompt, "negative_prompt", warnings) if request.uses_guidance else None
            )
        except OutOfMemory:
            release_cached_memory(self.backend.device)
            raise self._does_not_fit(request, "encoding its prompts") from None
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

        control_image = None
        if request.control is not None:
            pixels = torch.from_numpy(np.array(request.control.image)).permute(2, 0, 1).float() / 255.0  # a copy: writable
            control_image = pixels.unsqueeze(0).expand(k, -1, -1, -1).to(self.backend.device)
        state = RequestState(
            control_image=control_image,
            request=request,
            observer=observer,
            scheduler=scheduler,
            generators=generators,
            step_kwargs=step_kwargs,
            cond=_repeat(cond, k),
            uncond=None if uncond is None else _repeat(uncond, k),
            latents=latents,
            timings=timings,
            warnings=warnings,
        )
        observer.on_started(StartInfo(total_steps=state.total_steps))
        return state

    def _encode(self, text: str, field_name: str, warnings: list[str]) -> Context:
        encoding = self.prompts.encode(text)
        if encoding.truncated_tokens:
            warnings.append(
                f"{field_name} was truncated: {encoding.truncated_tokens} tokens beyond the text "
                f"encoder's limit of {self.config.text_max_length} were ignored"
            )
        return encoding.context

    # -- stage 2: step --------------------------------------------------------------------

    def step(self, states: Sequence[RequestState], observer: BatchObserver | None = None) -> None:
        """Advance every active state by one denoising step, with one UNet call for all of them.

        A state that its observer stops, that does not fit in memory even alone,
        or whose scheduler step runs out of memory gets ``error`` set and takes
        no further part; the others go on.
        """
        observer = observer or NullBatchObserver()
        for state in states:
            if state.active:
                state.error = state.observer.stop_reason()
        active = [state for state in states if state.active]
        if not active:
            return
        shapes = {tuple(state.latents.shape[1:]) for state in active}
        if len(shapes) != 1:
            raise ValueError(f"states in one step must share their latent shape; got {sorted(shapes)}")

        now = time.perf_counter()
        for state in active:
            if state.started_at is None:
                state.started_at = now

        # Model input: each state's latents scaled for its own timestep.
        for state in active:
            state.model_input = state.scheduler.scale_model_input(state.latents, state.timestep)

        # Noise prediction: one UNet call, a timestep per row (two with step caching: full and shallow passes).
        started = time.perf_counter()
        outputs = self._predict_noise(active, shapes.pop(), observer)
        observer.on_denoise_step(
            len(active), sum(s.request.num_images for s in active), time.perf_counter() - started
        )

        for state, output in zip(active, outputs):
            if output is None:
                state.error = self._does_not_fit(state.request, "a UNet call holding only this request")
                continue
            try:
                self._advance(state, output, observer)
            except OutOfMemory:
                release_cached_memory(self.backend.device)
                state.error = self._does_not_fit(state.request, "its denoising step or preview")

    def _predict_noise(
        self, states: list[RequestState], latent_shape: tuple[int, ...], observer: BatchObserver
    ) -> list[torch.Tensor | None]:
        """The UNet's output rows of every state (negative prompt's rows first), None for one that does not fit.

        All states share one call, except that under step caching the states
        taking a shallow pass share another (they run other blocks), and states
        with a ControlNet share one per ControlNet (they run another network;
        the batcher keeps such groups apart, so this split is only a safeguard).
        """
        passes = [state.unet_pass for state in states]
        full = [p for p in passes if p.kind == FULL]
        if full:  # plain rows ride along in a full pass; its deep features are simply not kept for them
            passes = [full[0] if p.kind == PLAIN and p.depth == 0 else p for p in passes]
        groups = [(p, state.controlnet) for p, state in zip(passes, states)]
        outputs: list[torch.Tensor | None] = [None] * len(states)
        for unet_pass, controlnet in dict.fromkeys(groups):
            members = [i for i, g in enumerate(groups) if g == (unet_pass, controlnet)]
            results = self._run_unet([states[i] for i in members], unet_pass, latent_shape, observer)
            for i, result in zip(members, results):
                outputs[i] = result
        return outputs

    def _run_unet(
        self, states: list[RequestState], unet_pass: UNetPass, latent_shape: tuple[int, ...], observer: BatchObserver
    ) -> list[torch.Tensor | None]:
        samples, contexts, timesteps, deep, spans = [], [], [], [], []
        control_images, control_scales = [], []
        row = 0
        for state in states:
            halves = [state.cond] if state.uncond is None else [state.uncond, state.cond]
            for context in halves:
                samples.append(state.model_input)
                contexts.append(context)
                if state.control_image is not None:  # diffusers steers both halves of guidance alike
                    control_images.append(state.control_image)
            timesteps.append(torch.full((state.rows,), float(state.timestep), dtype=torch.float32))
            control_scales.append(torch.full((state.rows,), state.control_scale(), dtype=torch.float32))
            if unet_pass.kind == SHALLOW:
                deep.append(state.deep)
            spans.append((row, row + state.rows))
            row += state.rows
        sample = torch.cat(samples)
        inputs = [sample, torch.cat(timesteps).to(sample.device), _cat_contexts(contexts), *_cat_deep(deep)]
        key = (latent_shape, unet_pass, states[0].controlnet)
        if control_images:
            if sum(image.shape[0] for image in control_images) != sample.shape[0]:
                raise ValueError("states with and without a ControlNet cannot share a UNet call")
            scales = torch.cat(control_scales)
            if bool((scales != 0).any()):  # all rows outside their windows: the plain UNet gives the same output
                if not isinstance(self.backend, RunsControlNets):
                    raise RuntimeError(f"backend {self.backend.name} runs no ControlNet")  # the resolver refuses first
                inputs.append(ControlRows(states[0].controlnet, torch.cat(control_images), scales))
                return self._unet_rows.run(self.backend.unet_controlled, inputs, spans, key, observer)
        if unet_pass.kind == PLAIN:
            return self._unet_rows.run(self.backend.unet, inputs, spans, key, observer)
        if not isinstance(self.backend, CachesDeepFeatures):
            raise RuntimeError(f"backend {self.backend.name} cannot cache steps")  # the resolver refuses this first
        depth = unet_pass.depth

        def split(sample, timestep, context, deep=None):  # noqa: ANN001, ANN202 - the runner's row slices
            return self.backend.unet_split(sample, timestep, context, depth, deep)

        results = self._unet_rows.run(split, inputs, spans, key, observer)
        outputs: list[torch.Tensor | None] = []
        for state, result in zip(states, results):
            if result is None:
                outputs.append(None)
                continue
            output, features = result
            if state.request.caches_steps and state.request.cache_depth == depth:
                state.deep = features
            outputs.append(output)
        return outputs

    def _advance(self, state: RequestState, output: torch.Tensor, observer: BatchObserver) -> None:
        """Guidance, the state's own scheduler step, and its progress event (with a preview when due)."""
        request = state.request
        k = request.num_images
        if state.uncond is not None:
            uncond, cond = output[:k], output[k:]
            eps = uncond + request.guidance_scale * (cond - uncond)
        else:
            eps = output

        t = state.timestep
        total = state.total_steps
        step = state.steps_done + 1
        due = request.preview.due(step, total)
        clean = None
        if due and request.preview.kind in (PreviewKind.APPROX_RGB, PreviewKind.FULL):
            clean = previews.predicted_clean_latent(
                state.scheduler, t, state.model_input, eps, self.config.prediction_type
            )
        state.latents = state.scheduler.step(eps, t, state.latents, **state.step_kwargs, return_dict=False)[0]
        state.steps_done = step

        preview: np.ndarray | None = None
        if due:
            if request.preview.kind is PreviewKind.LATENT:
                preview = state.latents.float().cpu().numpy()
            elif request.preview.kind is PreviewKind.APPROX_RGB:
                preview = previews.approx_rgb(clean)
            elif request.preview.kind is PreviewKind.FULL:
                decoded = self._decode(clean, observer)
                if decoded is None:
                    raise OutOfMemory("a preview decode did not fit even one image at a time")
                preview = previews.to_uint8_images(decoded)
            if self.safety is not None and preview is not None and request.preview.kind is not PreviewKind.LATENT:
                self.safety.blank_flagged(preview)  # a preview must not show what the result would withhold
        elapsed = time.perf_counter() - (state.started_at or 0.0)
        state.timings.denoise_s = elapsed
        state.observer.on_step(
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

    # -- stage 3: finish -------------------------------------------------------------------

    def finish(self, state: RequestState, observer: BatchObserver | None = None) -> GenerationResult:
        """Decode the final latents into float RGB images; raise why the state stopped, if it did."""
        if state.error is None:
            state.error = state.observer.stop_reason()  # no decode for a client that has gone
        if state.error is not None:
            raise state.error
        if not state.done:
            raise RuntimeError(f"request {state.request.request_id} finished after {state.steps_done} of "
                               f"{state.total_steps} steps")
        started = time.perf_counter()
        decoded = self._decode(state.latents, observer or NullBatchObserver())
        if decoded is None:
            state.error = self._does_not_fit(state.request, "decoding one of its images")
            raise state.error
        images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        filtered = self._filter(state, images, observer or NullBatchObserver())
        timings = state.timings
        timings.decode_s = time.perf_counter() - started
        timings.total_s = timings.text_encode_s + timings.denoise_s + timings.decode_s
        return GenerationResult(
            request=state.request,
            images=images,
            seeds=state.request.image_seeds(),
            timings=timings,
            warnings=state.warnings,
            filtered=filtered,
        )

    def _filter(self, state: RequestState, images: np.ndarray, observer: BatchObserver) -> list[bool]:
        """Black out the images the safety checker flags (when there is one), and say so."""
        if self.safety is None:
            return [False] * len(images)
        flagged = self.safety.blank_flagged(images)
        if any(flagged):
            withheld = [i for i, flag in enumerate(flagged) if flag]
            log.info("req=%s: the safety checker withheld image(s) %s", state.request.request_id, withheld)
            state.warnings.append(
                f"image(s) {', '.join(map(str, withheld))} withheld: the safety checker flagged them; "
                "they are black"
            )
            observer.on_images_filtered(len(withheld))
        return flagged

    def _decode(self, latents: torch.Tensor, observer: BatchObserver) -> torch.Tensor | None:
        """VAE decode of scaled latents (fewer images per call if memory runs out); None if one alone fails."""
        unscaled = latents / self.config.scaling_factor
        (decoded,) = self._decode_rows.run(
            self.backend.vae_decode, (unscaled,), [(0, unscaled.shape[0])], tuple(unscaled.shape[1:]), observer
        )
        return decoded

    def _does_not_fit(self, request: GenerationRequest, what: str) -> ResourceExhausted:
        log.warning("req=%s: %s ran out of memory even alone", request.request_id, what)
        return ResourceExhausted(
            f"request {request.request_id} does not fit in {self.backend.device} memory: {what} ran out of "
            f"memory even alone ({request.num_images} image(s) of {request.width}x{request.height}); "
            "try fewer images or a smaller size"
        )



def _repeat(context: Context, rows: int) -> Context:
    """A prompt's single-row encoding for each of a request's images."""
    if isinstance(context, CrossAttentionKV):
        return context.expand(rows)
    return context.expand(rows, -1, -1)


def _cat_contexts(contexts: list[Context]) -> Context:
    if isinstance(contexts[0], CrossAttentionKV):
        return CrossAttentionKV.cat(contexts)  # type: ignore[arg-type]
    return torch.cat(contexts)  # type: ignore[arg-type]


def _cat_deep(deep: list[torch.Tensor | None]) -> list[torch.Tensor]:
    return [torch.cat(deep)] if deep else []  # type: ignore[arg-type]
