"""The operations every front door offers: generate, stream, list models; and whether it accepts work.

A front door (the gRPC servicer; an HTTP gateway would be another) converts
its messages to ``GenerationParams``, calls these, and converts what comes
back. Here a request is resolved against its model (off the event loop when it
carries images to decode), answered from the result cache or queued on the
batcher, and its images encoded off the batcher's thread. Leaving early (a cancelled call, an exception in the caller) always
withdraws the request from the batcher, so its denoising stops at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from diffusiond.errors import Unavailable
from diffusiond.pipeline.request import GenerationRequest, StartInfo, StepInfo
from diffusiond.service.batcher import Batcher, EventChannel, QueuedInfo, RequestHandle
from diffusiond.service.models import LoadedModel, ModelRegistry
from diffusiond.service.outputs import EncodedResult, StartedEvent, StepEvent, encode_result, encode_step
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.service.result_cache import CachedResult, ResultCache, ResultKey, result_key

log = logging.getLogger(__name__)

ProgressEvent = QueuedInfo | StartedEvent | StepEvent | EncodedResult


class GenerationService:
    def __init__(self, registry: ModelRegistry, batcher: Batcher, result_cache: ResultCache | None = None) -> None:
        self.registry = registry
        self.batcher = batcher
        self.result_cache = result_cache
        self.ready = False  # set once models are loaded and warmed up
        self.draining = False  # set on shutdown: new requests get UNAVAILABLE

    def check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down and accepts no new requests; retry on another replica")
        if not self.ready:
            raise Unavailable("the server is still loading its models; retry shortly")

    def resolve(self, params: GenerationParams) -> tuple[LoadedModel, GenerationRequest]:
        self.check_accepting()
        model = self.registry.get(params.model)
        return model, resolve(params, model)

    async def _resolve(self, params: GenerationParams) -> tuple[LoadedModel, GenerationRequest]:
        """``resolve``; in a worker thread when it decodes images, so other calls are not held up."""
        if params.has_images:
            return await asyncio.to_thread(self.resolve, params)
        return self.resolve(params)

    def models(self) -> list[tuple[LoadedModel, bool]]:
        """Every loaded model, and whether it is the default."""
        return [(model, model.name == self.registry.default_name) for model in self.registry]

    async def generate(self, params: GenerationParams, deadline: float | None = None) -> EncodedResult:
        """The finished images; ``deadline`` is a ``time.monotonic()`` value."""
        model, request = await self._resolve(params)
        key = self._cache_key(params, request, model)
        cached = self._cached(key)
        if cached is not None:
            log.info("req=%s answered from the result cache", request.request_id)
            return cached.answer(request)
        handle = self._submit(request, model, deadline, params.client, stream=False)
        try:
            result = await handle.outcome
        finally:
            self.batcher.cancel(handle)  # no-op once finished; stops the work if the caller left
        encoded = await asyncio.to_thread(encode_result, result, model.backend.name)
        self._remember(key, encoded)
        return encoded

    async def stream(self, params: GenerationParams, deadline: float | None = None) -> AsyncIterator[ProgressEvent]:
        """Queue positions, the start, every step (with previews when due) and the result, in order."""
        model, request = await self._resolve(params)
        key = self._cache_key(params, request, model)
        cached = self._cached(key)
        if cached is not None:  # nothing is queued or denoised: the start, then the result
            log.info("req=%s answered from the result cache", request.request_id)
            total = model.pipeline.planned_steps(request)
            yield StartedEvent(request, model.name, model.backend.name, total)
            yield cached.answer(request)
            return
        handle = self._submit(request, model, deadline, params.client, stream=True)
        assert handle.events is not None
        try:
            while (item := await handle.events.get()) is not None:
                if isinstance(item, QueuedInfo):
                    yield item
                elif isinstance(item, StartInfo):
                    yield StartedEvent(request, model.name, model.backend.name, item.total_steps)
                elif isinstance(item, StepInfo):
                    yield StepEvent(item) if item.preview is None else await asyncio.to_thread(
                        encode_step, item, request
                    )
            result = await handle.outcome  # raises the request's error, if any
        finally:
            self.batcher.cancel(handle)
        encoded = await asyncio.to_thread(encode_result, result, model.backend.name)
        self._remember(key, encoded)
        yield encoded

    # -- helpers ----------------------------------------------------------------------

    def _submit(
        self, request: GenerationRequest, model: LoadedModel, deadline: float | None, client: str, stream: bool
    ) -> RequestHandle:
        events = EventChannel(self.batcher.settings.max_buffered_previews) if stream else None
        handle = RequestHandle(request, model, asyncio.get_running_loop(), deadline, events)
        log.info(
            "req=%s accepted%s: model=%s %dx%d steps=%d scheduler=%s images=%d seed=%d%s",
            request.request_id, f" from client={client}" if client else "", model.name, request.width,
            request.height, request.steps, request.scheduler, request.num_images, request.seed,
            describe_image_inputs(request),
        )
        self.batcher.submit(handle)
        return handle

    def _cache_key(self, params: GenerationParams, request: GenerationRequest, model: LoadedModel) -> ResultKey | None:
        """Only requests that carry their own seed are cacheable: the others ask for a new image."""
        if self.result_cache is None or params.seed is None:
            return None
        return result_key(request, model)

    def _cached(self, key: ResultKey | None) -> CachedResult | None:
        if key is None or self.result_cache is None:
            return None
        return self.result_cache.get(key)

    def _remember(self, key: ResultKey | None, result: EncodedResult) -> None:
        if key is not None and self.result_cache is not None:
            self.result_cache.put(key, CachedResult.of(result))


def describe_image_inputs(request: GenerationRequest) -> str:
    """The image inputs for a log line ("" for text to image); images appear by their digest only."""
    parts = []
    init = request.init
    if init is not None:
        kind = "inpaint" if init.inpainting else "img2img"
        parts.append(f" {kind} strength={init.strength:g} image={init.digest[:12]}")
        if init.inpainting:
            parts.append(f" mask_blur={init.mask_blur} keep_unmasked={init.keep_unmasked}")
    hires = request.hires
    if hires is not None:
        parts.append(f" hires={hires.width}x{hires.height} steps={hires.steps} strength={hires.strength:g} "
                     f"upscaler={hires.upscaler.value}")
    return "".join(parts)


def deadline_in(seconds: float | None) -> float | None:
    """A ``time.monotonic()`` deadline ``seconds`` from now (None: no deadline)."""
    return None if seconds is None else time.monotonic() + seconds
