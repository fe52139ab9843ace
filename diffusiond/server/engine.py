"""The request engine: a bounded queue and one worker thread that runs batches.

The servicer (asyncio) hands each accepted request to the engine as a
``RequestHandle``; the worker thread takes the oldest request off the queue,
gathers compatible ones (equal ``batch_key``: same model, and so backend,
size, steps and scheduler) until the batch holds ``max_batch_size`` images or
the oldest request has waited ``max_batch_delay_ms``, runs them through the
model's pipeline in one UNet batch and resolves each handle. Progress flows
back to the event loop through the handle's ``EventChannel``, which never
blocks the worker: a slow streaming client may miss intermediate previews,
never a step event or its result.

Backpressure: a full queue refuses at once (``ResourceExhausted``); a request
cancelled (or past its deadline) while queued leaves the queue at once and
never runs; one cancelled while running leaves its batch at the next step.
A batch that runs out of device memory anyway (the pipeline already splits
its network calls) is split in halves and retried; a request that does not
fit alone fails with ``ResourceExhausted`` and the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Protocol

from diffusiond.errors import Cancelled, DeadlineExceeded, DiffusiondError, ResourceExhausted, Unavailable
from diffusiond.models.registry import LoadedModel
from diffusiond.pipeline.memory import is_out_of_memory, release_cached_memory
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, PreviewKind, StartInfo, StepInfo
from diffusiond.pipeline.text2img import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedInfo:
    position: int


@dataclass(frozen=True)
class EngineSettings:
    max_queue: int = 64
    # Most images in one batch; a request counts its num_images (one with more runs alone).
    max_batch_size: int = 1
    # How long the oldest queued request may wait for compatible company.
    max_batch_delay_ms: float = 0.0
    # Unsent previews a streaming client may have buffered before older ones are dropped.
    max_buffered_previews: int = 2

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must not be negative, got {self.max_batch_delay_ms}")


class EngineMetrics(Protocol):
    """What the engine reports (implemented by ``server.metrics.ServerMetrics``); must not block."""

    def batch_formed(self, model: str, requests: int, images: int) -> None: ...

    def request_started(self, model: str, queue_wait_s: float) -> None: ...

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None: ...

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None: ...

    def out_of_memory(self, model: str, what: str, rows: int) -> None: ...


class NullEngineMetrics:
    def batch_formed(self, model: str, requests: int, images: int) -> None:
        pass

    def request_started(self, model: str, queue_wait_s: float) -> None:
        pass

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None:
        pass

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None:
        pass

    def out_of_memory(self, model: str, what: str, rows: int) -> None:
        pass


class _BatchObserver:
    """Forwards the pipeline's batch-wide hooks to the engine's metrics, labelled by model."""

    def __init__(self, model: str, metrics: EngineMetrics) -> None:
        self._model = model
        self._metrics = metrics

    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        self._metrics.denoise_step(self._model, requests, images, seconds)

    def on_out_of_memory(self, network: str, rows: int) -> None:
        self._metrics.out_of_memory(self._model, network, rows)


class EventChannel:
    """Progress events for one streaming call. Lives on the event loop; fed via ``call_soon_threadsafe``."""

    def __init__(self, max_buffered_previews: int) -> None:
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._max_previews = max_buffered_previews
        self.dropped_previews = 0

    def put(self, item: Any) -> None:
        if isinstance(item, StepInfo) and item.preview is not None:
            with_preview = [i for i, x in enumerate(self._items) if isinstance(x, StepInfo) and x.preview is not None]
            while len(with_preview) >= self._max_previews:
                i = with_preview.pop(0)
                self._items[i] = replace(self._items[i], preview=None, preview_kind=PreviewKind.NONE)
                self.dropped_previews += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Any | None:
        """The next event, or None once the request is resolved and every event was read."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class RequestHandle:
    """One accepted request: what the worker runs and how its outcome reaches the caller."""

    def __init__(
        self,
        request: GenerationRequest,
        model: LoadedModel,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
        events: EventChannel | None = None,
    ) -> None:
        self.request = request
        self.model = model
        self.loop = loop
        self.deadline = deadline  # time.monotonic() value
        self.events = events
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.outcome: asyncio.Future[GenerationResult] = loop.create_future()
        # A caller that went away never reads its outcome; retrieve it so asyncio does not complain.
        self.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._cancelled = threading.Event()
        self._abort: BaseException | None = None
        self._started_sent = False
        self._last_step_sent = 0
        self._position_sent: int | None = None

    @property
    def images(self) -> int:
        return self.request.num_images

    # -- called from the event loop -------------------------------------------

    def cancel(self) -> None:
        """The client went away: stop at the next step, or never start."""
        self._cancelled.set()

    def wait_cancelled(self, timeout: float) -> bool:
        """Wait until the request was told to stop (cancelled, or aborted by shutdown)."""
        return self._cancelled.wait(timeout)

    # -- called from the worker thread (JobObserver) ----------------------------

    def stop_reason(self) -> BaseException | None:
        if self._abort is not None:
            return self._abort
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded(f"request {self.request.request_id} ran past its deadline")
        if self._cancelled.is_set():
            return Cancelled(f"request {self.request.request_id} was cancelled by the client")
        return None

    def abort(self, reason: BaseException) -> None:
        """End the request at its next step with ``reason`` (shutdown past the grace period)."""
        self._abort = reason
        self._cancelled.set()

    def on_started(self, info: StartInfo) -> None:
        # A batch retried smaller after running out of memory starts again; the client hears it once.
        if not self._started_sent:
            self._started_sent = True
            self._emit(info)

    def on_step(self, info: StepInfo) -> None:
        if info.step > self._last_step_sent:
            self._last_step_sent = info.step
            self._emit(info)

    def queued(self, position: int) -> None:
        if position != self._position_sent:
            self._position_sent = position
            self._emit(QueuedInfo(position))

    def resolve(self, outcome: GenerationResult | BaseException) -> None:
        if isinstance(outcome, GenerationResult) and self.started_at is not None:
            outcome.timings.queue_s = self.started_at - self.enqueued_at
        self.loop.call_soon_threadsafe(self._set_outcome, outcome)

    def _emit(self, item: Any) -> None:
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put, item)

    def _set_outcome(self, outcome: GenerationResult | BaseException) -> None:
        if not self.outcome.done():
            if isinstance(outcome, BaseException):
                self.outcome.set_exception(outcome)
            else:
                self.outcome.set_result(outcome)
        if self.events is not None:
            self.events.close()


class Engine:
    def __init__(self, settings: EngineSettings | None = None, metrics: EngineMetrics | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.metrics: EngineMetrics = metrics or NullEngineMetrics()
        self._pending: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._busy = False
        self._abort: BaseException | None = None
        self.running: list[RequestHandle] = []  # the batch in the pipeline now
        self._thread = threading.Thread(target=self._work, name="diffusiond-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    def submit(self, handle: RequestHandle) -> int:
        """Queue a request; return how many requests are ahead of it (a running batch counts as one)."""
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down and accepts no new requests")
            if len(self._pending) >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({len(self._pending)} of {self.settings.max_queue} places "
                    "taken); retry later"
                )
            position = len(self._pending) + (1 if self._busy else 0)
            self._pending.append(handle)
            self._cond.notify_all()
        handle.queued(position)
        return position

    def cancel(self, handle: RequestHandle) -> None:
        """The caller went away: a queued request leaves the queue now, a running one at its next step."""
        handle.cancel()
        with self._cond:
            try:
                self._pending.remove(handle)
            except ValueError:
                return  # running, finished, or never queued
            self._cond.notify_all()
        reason = handle.stop_reason() or Cancelled(f"request {handle.request.request_id} was cancelled")
        log.info("req=%s left the queue: %s", handle.request.request_id, reason)
        handle.resolve(reason)
        self._publish_positions()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until queued and running work is done; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def abort(self, reason: str) -> None:
        """Fail queued requests and stop running ones at their next step, all with UNAVAILABLE."""
        with self._cond:
            self._accepting = False
            self._abort = Unavailable(f"request not finished: {reason}")
            leftovers = list(self._pending)
            self._pending.clear()
            running = list(self.running)
            self._cond.notify_all()
        for handle in running:
            handle.abort(Unavailable(f"request {handle.request.request_id} was stopped: {reason}"))
        for handle in leftovers:
            handle.resolve(Unavailable(f"request {handle.request.request_id} was not run: {reason}"))

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop the worker; requests still queued or running fail with UNAVAILABLE (never dropped silently)."""
        self.abort(reason)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- worker thread ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._run(batch)
            except Exception:  # never let the worker die: the server must go on serving
                log.exception("the engine failed running a batch")
                for handle in batch:
                    handle.resolve(Unavailable(f"request {handle.request.request_id} failed in the engine"))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _next_batch(self) -> list[RequestHandle] | None:
        limit = self.settings.max_batch_size
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            self._busy = True
            batch, images = [first], first.images
            key = first.request.batch_key()
            # The delay counts from the oldest request's arrival: one that already waited behind
            # a running batch does not wait again.
            give_up = first.enqueued_at + self.settings.max_batch_delay_ms / 1000.0
            while images < limit:
                for handle in list(self._pending):
                    if images + handle.images <= limit and handle.request.batch_key() == key:
                        self._pending.remove(handle)
                        batch.append(handle)
                        images += handle.images
                remaining = give_up - time.monotonic()
                if images >= limit or remaining <= 0 or self._stopping or self._abort is not None:
                    break
                self._cond.wait(remaining)
        self._publish_positions()
        runnable = []
        for handle in batch:
            reason = handle.stop_reason()
            if reason is not None:
                log.info("req=%s not run: %s", handle.request.request_id, reason)
                handle.resolve(reason)
            else:
                runnable.append(handle)
        return runnable

    def _publish_positions(self) -> None:
        with self._cond:
            waiting = list(self._pending)
            ahead = 1 if self._busy else 0
        for position, handle in enumerate(waiting, start=ahead):
            handle.queued(position)

    def _run(self, batch: list[RequestHandle]) -> None:
        model = batch[0].model
        started = time.monotonic()
        for handle in batch:
            handle.started_at = started
            self.metrics.request_started(model.name, started - handle.enqueued_at)
        self.metrics.batch_formed(model.name, len(batch), sum(h.images for h in batch))
        self._run_splitting(batch)

    def _run_splitting(self, batch: list[RequestHandle]) -> None:
        """Run ``batch``; out of memory -> run its halves one after the other (one alone -> RESOURCE_EXHAUSTED)."""
        model = batch[0].model
        ids = ",".join(h.request.request_id for h in batch)
        log.info("running batch of %d (%d images) on %s: req=%s", len(batch), sum(h.images for h in batch),
                 model.name, ids)
        self.running = batch
        try:
            outcomes: list[Any] = model.pipeline.run(
                [Job(h.request, h) for h in batch], _BatchObserver(model.name, self.metrics)
            )
        except DiffusiondError as exc:
            outcomes = [exc] * len(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):  # a bug or a backend failure: the server keeps serving
                log.exception("batch req=%s failed", ids)
                outcomes = [exc] * len(batch)
            else:
                release_cached_memory(model.backend.device)
                if len(batch) > 1:
                    self.running = []
                    self.metrics.out_of_memory(model.name, "batch", sum(h.images for h in batch))
                    half = (len(batch) + 1) // 2
                    log.warning("batch req=%s ran out of memory; retrying it as %d + %d requests",
                                ids, half, len(batch) - half)
                    self._run_splitting(batch[:half])
                    self._run_splitting(batch[half:])
                    return
                request = batch[0].request
                outcomes = [ResourceExhausted(
                    f"request {request.request_id} does not fit in {model.backend.device} memory even alone "
                    f"({request.num_images} image(s) of {request.width}x{request.height}); "
                    "try fewer images or a smaller size"
                )]
        finally:
            self.running = []
        for handle, outcome in zip(batch, outcomes):
            self._resolve(handle, outcome)

    def _resolve(self, handle: RequestHandle, outcome: GenerationResult | BaseException) -> None:
        request = handle.request
        if isinstance(outcome, BaseException):
            log.info("req=%s ended: %s: %s", request.request_id, type(outcome).__name__, outcome)
        else:
            log.info("req=%s done in %.2fs (%d steps)", request.request_id, outcome.timings.total_s, request.steps)
        inference_s = time.monotonic() - (handle.started_at or handle.enqueued_at)
        self.metrics.request_finished(handle.model.name, inference_s, not isinstance(outcome, BaseException))
        handle.resolve(outcome)
