"""Text to image (and image to image, inpainting, hi-res fix), one step at a time, for any number of requests at once.

The algorithm is diffusers' StableDiffusionPipeline (same tokenization, noise,
scheduler calls and guidance arithmetic, so its images match to float
rounding), cut into stages so that a batcher can interleave requests:

    state = pipeline.prepare(request)   # encode prompts (and images), set timesteps, seeded noise
    while not state.done:
        pipeline.step([state, ...])     # one UNet call for every state given
    result = pipeline.finish(state)     # decode

Image inputs enter at ``prepare`` and ride in each state, so image-conditioned
and plain requests share UNet calls:

- img2img (``StableDiffusionImg2ImgPipeline``): the init image's latents (the
  VAE encoder's mean, diffusers' ``sample_mode="argmax"``: deterministic, and
  what every backend's encoder returns) are noised with the request's own
  generators to the first of the ``int(steps * strength)`` timesteps that run.
  Strength 1 starts from pure noise, as diffusers' inpainting pipeline does,
  so it equals text to image; strength 0 runs no step and returns the VAE round
  trip of the input.
- inpainting (``StableDiffusionInpaintPipeline``): with a 4-channel UNet,
  after every step the kept area of the latents is reset to the init image's
  latents noised to the next timestep (``Blend``); with a 9-channel
  inpainting UNet, every row carries the latent mask and the masked image's
  latents as extra input channels. On such a UNet every row needs them, so
  rows without a mask get what diffusers computes for an all-white mask:
  mask 1 everywhere and the latents of an all-zero (mid-grey) image.
- hi-res fix: a second pass (``Pass``) at the larger size, img2img over the
  first pass's upscaled result. It begins inside the step that ends the first
  pass; from then on the state's latents have the new shape, so it can only
  share calls with states of that shape (the batcher moves it; see
  ``service.batcher``). Step numbers and ``total_steps`` count both passes.

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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from diffusiond.backends.base import (
    AdapterSet,
    AppliesAdapters,
    Backend,
    CachesDeepFeatures,
    ControlRows,
    CrossAttentionKV,
    RunsControlNets,
)
from diffusiond.errors import OutOfMemory, ResourceExhausted
from diffusiond.models.config import ModelConfig
from diffusiond.models.latent_rgb import SD_PROJECTION, LatentRGB
from diffusiond.models.lora import LoadedAdapter
from diffusiond.pipeline import conditioning as images_in
from diffusiond.pipeline import previews
from diffusiond.pipeline.memory import RowRunner, release_cached_memory
from diffusiond.pipeline.observers import BatchObserver, JobObserver, NullBatchObserver, NullObserver
from diffusiond.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    HiresSpec,
    PreviewKind,
    StartInfo,
    StepInfo,
    Timings,
    Upscaler,
)
from diffusiond.pipeline.safety import SafetyChecker
from diffusiond.pipeline.schedulers import SchedulerFactory, timesteps_for_strength
from diffusiond.pipeline.text import PromptEncoder
from diffusiond.pipeline.tiny_decoder import TinyDecoder

log = logging.getLogger(__name__)

Context = torch.Tensor | CrossAttentionKV


class AdapterSource(Protocol):
    """Where the pipeline gets a LoRA adapter's tensors by name, for its model (``service.adapters``)."""

    def load(self, name: str) -> LoadedAdapter:
        ...


# Sizes whose all-white-mask conditioning (for rows without a mask on an inpainting UNet) is kept.
FULL_MASK_CACHE_SIZES = 8


@dataclass
class Blend:
    """4-channel inpainting: after every step the kept area is reset to the init image's latents,
    noised to the next timestep (what diffusers does for UNets without mask inputs)."""

    image_latents: torch.Tensor  # [k, C, h, w] scaled latents of the init image
    noise: torch.Tensor  # [k, C, h, w] the noise the pass started from
    mask: torch.Tensor  # [1, 1, h, w] 1 = repaint, 0 = keep


@dataclass
class Pass:
    """One denoising pass of a request: its size, its own scheduler and timesteps, and what its rows carry."""

    width: int
    height: int
    scheduler: Any  # its own instance: multistep schedulers keep history
    step_kwargs: dict[str, Any]  # eta / generator, for schedulers that take them
    timesteps: torch.Tensor  # the ones this pass runs (img2img runs the last part of the schedule)
    first_step: int  # steps the request took before this pass
    conditioning: torch.Tensor | None = None  # [k, 1 + C, h, w] mask and masked-image latents (9-channel UNet)
    blend: Blend | None = None  # 4-channel inpainting

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class LoadedAdapters:
    """A request's LoRA adapter set with its tensors; ``key`` identifies it (empty: none)."""

    key: tuple[object, ...] = ()
    loaded: tuple[tuple[LoadedAdapter, float], ...] = ()


@dataclass
class RequestState:
    """One request between ``prepare`` and ``finish``: everything its next step needs."""

    request: GenerationRequest
    observer: JobObserver
    generators: list[torch.Generator]  # one per image, seeded seed + i
    cond: Context  # [k, T, D] prompt encoding (or its cross-attention keys and values)
    uncond: Context | None  # the negative prompt's; None without guidance
    current: Pass
    latents: torch.Tensor  # [k, C, h, w] on the backend's device, at the current pass's size
    total_steps: int  # every pass's steps
    timings: Timings
    warnings: list[str]
    next_pass: HiresSpec | None = None  # the hi-res pass still to come
    steps_done: int = 0  # over all passes
    started_at: float | None = None  # perf_counter() at its first step
    model_input: torch.Tensor | None = None  # the scaled latents of the step in progress
    deep: torch.Tensor | None = None  # step caching: the UNet's deep features from its latest full pass
    error: BaseException | None = None  # set when it stops early; finish raises it
    adapters: LoadedAdapters = field(default_factory=LoadedAdapters)  # its LoRA set, loaded once in prepare
    control_image: torch.Tensor | None = None  # [k, 3, H, W] in [0, 1]: its ControlNet's image, once per image

    @property
    def controlnet(self) -> str:
        return self.request.controlnet

    def control_scale(self) -> float:
        """The conditioning scale of the step in progress (0 outside the request's guidance window)."""
        control = self.request.control
        return 0.0 if control is None else control.scale_at(self.steps_done, self.total_steps)

    @property
    def scheduler(self) -> Any:
        return self.current.scheduler

    @property
    def pass_done(self) -> bool:
        return self.steps_done - self.current.first_step >= self.current.steps

    @property
    def done(self) -> bool:
        return self.pass_done and self.next_pass is None

    @property
    def active(self) -> bool:
        return self.error is None and not self.done

    @property
    def timestep(self) -> torch.Tensor:
        return self.current.timesteps[self.steps_done - self.current.first_step]

    @property
    def rows(self) -> int:
        """UNet rows per step: one per image, two with guidance."""
        return self.request.num_images * (1 if self.uncond is None else 2)

    def latent_group(self) -> tuple[object, ...]:
        """The request's latent group for the pass in progress (a hi-res pass changes it; its adapter set and
        ControlNet do not change)."""
        return (self.request.model, self.current.width, self.current.height, self.request.adapters,
                self.request.controlnet)

    @property
    def unet_pass(self) -> UNetPass:
        """Which UNet pass this step takes: step caching reuses deep features between full passes
        (counted within each pass: a hi-res pass starts with a full one, its latents being larger)."""
        request = self.request
        if not request.caches_steps:
            return UNetPass(PLAIN, 0)
        if self.deep is None or (self.steps_done - self.current.first_step) % request.cache_interval == 0:
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
        adapters: AdapterSource | None = None,
        latent_rgb: LatentRGB | None = None,
        tiny_decoder: TinyDecoder | None = None,
    ) -> None:
        self.backend = backend
        self.adapters = adapters  # LoRA adapters by name, for a backend that applies them
        self.prompts = prompts
        self.schedulers = schedulers
        self.config = config
        self.safety = safety  # when set, every image and preview image handed out is checked
        # APPROX_RGB previews' projection; SD 1.x's factors when the caller has none (4-channel latents only).
        self.latent_rgb = latent_rgb or SD_PROJECTION
        self.tiny_decoder = tiny_decoder  # TINY_DECODER previews, where the model has one
        self._unet_rows = RowRunner("unet", backend.device)
        self._decode_rows = RowRunner("vae_decode", backend.device)
        self._encode_rows = RowRunner("vae_encode", backend.device)
        self._full_mask: dict[tuple[int, int], torch.Tensor] = {}  # (width, height) -> [1, 1 + C, h, w]

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
        while True:
            by_shape: dict[tuple[int, ...], list[RequestState]] = {}
            for _, state in states:
                if state.active:
                    by_shape.setdefault(tuple(state.latents.shape[1:]), []).append(state)
            if not by_shape:
                break
            for group in by_shape.values():  # a hi-res pass has a shape of its own
                self.step(group, batch_observer)
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
        self._encode_rows.forget()

    def planned_steps(self, request: GenerationRequest) -> int:
        """The denoising steps ``request`` takes over all its passes (what ``Started.total_steps`` says)."""
        strength = None if request.init is None else request.init.strength
        return self.schedulers.total_steps(request.scheduler, request.steps, strength) + self._hires_steps(request)

    def _hires_steps(self, request: GenerationRequest) -> int:
        hires = request.hires
        return 0 if hires is None else self.schedulers.total_steps(request.scheduler, hires.steps, hires.strength)

    # -- stage 1: prepare ---------------------------------------------------------------

    def prepare(self, request: GenerationRequest, observer: JobObserver | None = None) -> RequestState:
        """Encode the prompts (and image inputs), set the timesteps and draw the seeded noise."""
        observer = observer or NullObserver()
        started = time.perf_counter()
        warnings: list[str] = []
        k = request.num_images
        adapters = self.load_adapters(request.adapters)
        self.use_adapters(adapters)  # precomputed cross-attention keys and values depend on them
        try:
            cond = self._encode(request.prompt, "prompt", warnings, adapters.key)
            uncond = (
                self._encode(request.negative_prompt, "negative_prompt", warnings, adapters.key)
                if request.uses_guidance else None
            )
        except OutOfMemory:
            release_cached_memory(self.backend.device)
            raise self._does_not_fit(request, "encoding its prompts") from None
        timings = Timings(text_encode_s=time.perf_counter() - started)

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.image_seeds()]
        try:
            first, latents = self._first_pass(request, generators, timings)
            state = RequestState(
                request=request,
                observer=observer,
                generators=generators,
                cond=_repeat(cond, k),
                uncond=None if uncond is None else _repeat(uncond, k),
                current=first,
                latents=latents,
                total_steps=first.steps + self._hires_steps(request),
                timings=timings,
                warnings=warnings,
                next_pass=request.hires,
                adapters=adapters,
                control_image=self._control_image(request),
            )
            if state.pass_done and state.next_pass is not None:  # a first pass of no steps (strength 0)
                self._begin_next_pass(state, NullBatchObserver())
        except OutOfMemory:
            release_cached_memory(self.backend.device)
            raise self._does_not_fit(request, "encoding its image inputs") from None
        observer.on_started(StartInfo(total_steps=state.total_steps))
        return state

    def _control_image(self, request: GenerationRequest) -> torch.Tensor | None:
        """The request's control image as [k, 3, H, W] floats in [0, 1] (what diffusers feeds a ControlNet)."""
        if request.control is None:
            return None
        pixels = torch.from_numpy(np.array(request.control.image)).permute(2, 0, 1).float() / 255.0  # a copy: writable
        return pixels.unsqueeze(0).expand(request.num_images, -1, -1, -1).to(self.backend.device)

    def _first_pass(
        self, request: GenerationRequest, generators: list[torch.Generator], timings: Timings
    ) -> tuple[Pass, torch.Tensor]:
        """The request's own pass: text to image, or img2img / inpainting from its init image."""
        init = request.init
        if init is None:
            first, latents, _ = self._begin_pass(
                request, generators, request.width, request.height, request.steps, None, None, 0
            )
            return first, latents
        started = time.perf_counter()
        k = request.num_images
        image = images_in.pixels_to_tensor(init.pixels).to(self.backend.device)
        # Channels-last, as diffusers' latents come out of its VAE encode: a convolution's rounding follows
        # its input's memory layout, and a multistep scheduler (PLMS) can amplify a 1e-6 difference 20-fold.
        clean = self._vae_encode(image).repeat(k, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        mask = conditioning = None
        if init.mask is not None:
            pixel_mask = images_in.binary_mask(init.mask).to(self.backend.device)
            mask = images_in.latent_mask(pixel_mask, clean.shape[2], clean.shape[3])
            if self.config.inpainting_unet:
                masked = self._vae_encode(images_in.masked_image(image, pixel_mask))
                conditioning = torch.cat([mask, masked], dim=1).repeat(k, 1, 1, 1)
        timings.image_encode_s = time.perf_counter() - started
        first, latents, noise = self._begin_pass(
            request, generators, request.width, request.height, request.steps, init.strength, clean, 0, conditioning
        )
        if mask is not None and not self.config.inpainting_unet:
            first.blend = Blend(image_latents=clean, noise=noise, mask=mask)
        return first, latents

    def _begin_pass(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        width: int,
        height: int,
        steps: int,
        strength: float | None,
        clean: torch.Tensor | None,
        first_step: int,
        conditioning: torch.Tensor | None = None,
    ) -> tuple[Pass, torch.Tensor, torch.Tensor]:
        """A pass's scheduler, timesteps, starting latents and the noise in them: pure noise, or ``clean``
        (scaled latents) noised to the first timestep ``strength`` keeps (diffusers' ``get_timesteps``
        and ``prepare_latents``). ``strength`` None is text to image."""
        scheduler = self.schedulers.create(request.scheduler)
        scheduler.set_timesteps(steps, device=self.backend.device)
        timesteps = scheduler.timesteps if strength is None else timesteps_for_strength(scheduler, steps, strength)

        f = self.config.vae_scale_factor
        shape = (1, self.config.latent_channels, height // f, width // f)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        noise = noise.to(self.backend.device)
        if clean is None or (strength is not None and strength >= 1.0):
            latents = noise * scheduler.init_noise_sigma
        elif len(timesteps) == 0:
            latents = clean  # strength 0: the VAE round trip of the input
        else:
            latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(generators)))

        step_params = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            step_kwargs["generator"] = generators
        if conditioning is None and self.config.inpainting_unet:
            conditioning = self._full_mask_conditioning(width, height).repeat(len(generators), 1, 1, 1)
        current = Pass(width, height, scheduler, step_kwargs, timesteps, first_step, conditioning)
        return current, latents, noise

    def _begin_next_pass(self, state: RequestState, observer: BatchObserver) -> None:
        """Upscale the finished pass and start the hi-res pass from it (OutOfMemory if that does not fit)."""
        spec = state.next_pass
        assert spec is not None
        state.next_pass = None
        f = self.config.vae_scale_factor
        if spec.upscaler is Upscaler.LATENT_BICUBIC:
            clean = images_in.upscale_latents(state.latents, spec.height // f, spec.width // f)
        else:
            decoded = self._decode(state.latents, observer)
            if decoded is None:
                raise OutOfMemory("the decode before the hi-res upscale did not fit even one image at a time")
            larger = images_in.resize_images(previews.to_uint8_images(decoded), spec.width, spec.height)
            pixels = torch.cat([images_in.pixels_to_tensor(p) for p in larger]).to(self.backend.device)
            clean = self._vae_encode(pixels, observer)
        state.deep = None  # the first pass's deep features have the first pass's size
        state.current, state.latents, _ = self._begin_pass(
            state.request, state.generators, spec.width, spec.height, spec.steps, spec.strength, clean,
            state.steps_done,
        )

    def _vae_encode(self, images: torch.Tensor, observer: BatchObserver | None = None) -> torch.Tensor:
        """[B, 3, H, W] images in [-1, 1] -> [B, C, h, w] scaled latents; OutOfMemory if one image alone does not fit."""
        (latents,) = self._encode_rows.run(
            self.backend.vae_encode, (images,), [(0, images.shape[0])], tuple(images.shape[1:]), observer
        )
        if latents is None:
            raise OutOfMemory("a VAE encode did not fit even one image at a time")
        return latents * self.config.scaling_factor

    def _full_mask_conditioning(self, width: int, height: int) -> torch.Tensor:
        """What an inpainting UNet's rows without a mask carry: diffusers' conditioning for an all-white
        mask (mask 1 everywhere, latents of an all-zero image), computed once per size."""
        key = (width, height)
        cached = self._full_mask.get(key)
        if cached is None:
            zeros = torch.zeros((1, 3, height, width), device=self.backend.device)
            masked = self._vae_encode(zeros)
            ones = torch.ones((1, 1, *masked.shape[2:]), device=masked.device)
            cached = torch.cat([ones, masked], dim=1)
            if len(self._full_mask) >= FULL_MASK_CACHE_SIZES:
                self._full_mask.pop(next(iter(self._full_mask)))
            self._full_mask[key] = cached
        return cached

    def load_adapters(self, adapters: AdapterSet) -> LoadedAdapters:
        """The request's adapters with their tensors, looked up once per request (not at every step). The
        key names the set: names, scales and the files' versions, so an adapter file replaced on disk is a
        new set. Empty on a backend whose adapters are fixed at export (the resolver has checked those)."""
        if not adapters or not isinstance(self.backend, AppliesAdapters):
            return LoadedAdapters()
        if self.adapters is None:
            raise RuntimeError("a request with adapters reached a pipeline without an adapter source")
        loaded = tuple((self.adapters.load(name), scale) for name, scale in adapters)
        key = tuple((a.name, scale, a.file.mtime_ns, a.file.size_bytes) for a, scale in loaded)
        return LoadedAdapters(key, loaded)

    def use_adapters(self, adapters: LoadedAdapters) -> None:
        """Make ``adapters`` the backend's adapter set (nothing to do when it is already)."""
        if isinstance(self.backend, AppliesAdapters):
            self.backend.set_adapters(adapters.key, list(adapters.loaded))

    def _encode(self, text: str, field_name: str, warnings: list[str], adapters: Hashable = ()) -> Context:
        encoding = self.prompts.encode(text, adapters)
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
        adapter_sets = {state.request.adapters for state in active}
        if len(adapter_sets) != 1:
            raise ValueError(f"states in one step must share their adapter set; got {sorted(adapter_sets)}")
        self.use_adapters(active[0].adapters)

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
                state.error = self._does_not_fit(state.request, "its denoising step, preview or hi-res upscale")

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
            unet_input = state.model_input
            if state.current.conditioning is not None:  # an inpainting UNet: mask and masked-image latents
                unet_input = torch.cat([unet_input, state.current.conditioning], dim=1)
            for context in halves:
                samples.append(unet_input)
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
        """Guidance, the state's own scheduler step (and inpainting blend), its progress event (with a
        preview when due), and the start of its hi-res pass when this step ended the first."""
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
        if due and request.preview.kind in (PreviewKind.APPROX_RGB, PreviewKind.FULL, PreviewKind.TINY_DECODER):
            clean = previews.predicted_clean_latent(
                state.scheduler, t, state.model_input, eps, self.config.prediction_type
            )
        current = state.current
        state.latents = current.scheduler.step(eps, t, state.latents, **current.step_kwargs, return_dict=False)[0]
        state.steps_done = step
        if current.blend is not None:
            self._blend(state)

        preview: np.ndarray | None = None
        if due:
            if request.preview.kind is PreviewKind.LATENT:
                preview = state.latents.float().cpu().numpy()
            elif request.preview.kind is PreviewKind.APPROX_RGB:
                preview = previews.approx_rgb(clean, self.latent_rgb)
            elif request.preview.kind is PreviewKind.FULL:
                decoded = self._decode(clean, observer)
                if decoded is None:
                    raise OutOfMemory("a preview decode did not fit even one image at a time")
                preview = previews.to_uint8_images(decoded)
            elif request.preview.kind is PreviewKind.TINY_DECODER:
                if self.tiny_decoder is None:  # the resolver refuses such requests first
                    raise RuntimeError("a TINY_DECODER preview was asked of a model without a tiny decoder")
                preview = self.tiny_decoder.decode(clean)
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
                width=current.width,
                height=current.height,
            )
        )
        if state.pass_done and state.next_pass is not None:
            self._begin_next_pass(state, observer)

    @staticmethod
    def _blend(state: RequestState) -> None:
        """Keep the unmasked area: the init image's latents, noised to the next timestep (none after the last)."""
        current = state.current
        blend = current.blend
        assert blend is not None
        kept = blend.image_latents
        following = state.steps_done - current.first_step
        if following < current.steps:
            kept = current.scheduler.add_noise(kept, blend.noise, current.timesteps[following : following + 1])
        state.latents = (1 - blend.mask) * kept + blend.mask * state.latents

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
        init = state.request.init
        if init is not None and init.keep_unmasked and init.mask is not None:
            images = images_in.paste_unmasked(images, init.pixels, init.mask)
        filtered = self._filter(state, images, observer or NullBatchObserver())
        timings = state.timings
        timings.decode_s = time.perf_counter() - started
        timings.total_s = timings.text_encode_s + timings.image_encode_s + timings.denoise_s + timings.decode_s
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
            f"memory even alone ({request.num_images} image(s) of {request.output_width}x{request.output_height}); "
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
