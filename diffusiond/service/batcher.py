"""The batcher: a bounded queue and one worker thread that advances a running set of requests step by step.

Front doors (the gRPC servicer, on asyncio) hand each accepted request to the
batcher as a ``RequestHandle``. The worker keeps a *running set* of request
states and, at every step boundary, as LLM servers do between decode steps:

1. retires requests that were cancelled, ran past their deadline or were aborted;
2. admits queued requests (``continuous`` batching): requests of the running
   set's latent group (same model and image size), oldest first, while the set
   holds at most ``max_batch_size`` images. Steps, scheduler, guidance, seed and
   prompt may all differ: every row carries its own timestep;
3. runs one denoising step for the whole set (one UNet call);
4. decodes and resolves the requests that took their last step.

A request that arrives while others are denoising starts at the next step, not
after the whole batch. Admission is strictly first come, first served: it
stops at the first queued request that cannot join (another size or model, or
too many images for the room left), so no request waits behind later ones
indefinitely; that one starts as soon as the running set has drained. When the
set is empty, the oldest request may wait up to ``max_batch_delay_ms`` (from
its arrival) for company.

A hi-res request changes latent shape half-way: the step that ends its first
pass starts its second at the larger size. It can then no longer share the
running set's UNet call, so after that step the batcher moves it out of the
running set, state and all, into a *resuming* line that stands before the
queue: it is older than anything queued, and it re-enters exactly as a queued
request of its new size would: it joins a running set of that size, or, as
first come, it stops admission until the current set drains and then forms
the next set (with any queued requests of its size). It keeps its steps,
generators and events; its step numbers go on from where they were. A
request cancelled while resuming leaves at once, like a queued one.

``static`` batching (kept for comparison) is the behaviour before continuous
batching: a batch forms only when nothing runs, from requests with the same
model, size, steps and scheduler anywhere in the queue, and runs from its first
step to its last with no one joining.

Progress flows back to the event loop through the handle's ``EventChannel``,
which never blocks the worker: a slow streaming client may miss intermediate
previews, never a step event or its result. Backpressure: a full queue refuses
at once (``ResourceExhausted``); a request cancelled (or past its deadline)
while queued leaves the queue at once and never runs. Out of memory: the
pipeline splits UNet calls and decodes; a request that does not fit alone ends
with ``ResourceExhausted`` and the others go on from the step they reached.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from diffusiond.errors import Cancelled, DeadlineExceeded, DiffusiondError, ResourceExhausted, Unavailable
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, PreviewKind, StartInfo, StepInfo
from diffusiond.pipeline.text2img import RequestState
from diffusiond.service.models import LoadedModel

log = logging.getLogger(__name__)


class Batching(str, enum.Enum):
    CONTINUOUS = "continuous"
    STATIC = "static"


@dataclass(frozen=True)
class QueuedInfo:
    position: int


@dataclass(frozen=True)
class BatcherSettings:
    max_queue: int = 64
    # Most images denoised together; a request counts its num_images (one with more runs alone).
    max_batch_size: int = 1
    # How long the oldest queued request may wait for company when nothing is running.
    max_batch_delay_ms: float = 0.0
    batching: Batching = Batching.CONTINUOUS
    # Unsent previews a streaming client may have buffered before older ones are dropped.
    max_buffered_previews: int = 2

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must not be negative, got {self.max_batch_delay_ms}")
        try:
            object.__setattr__(self, "batching", Batching(self.batching))
        except ValueError:
            raise ValueError(
                f"batching must be one of {', '.join(b.value for b in Batching)}, got {self.batching!r}"
            ) from None


class BatcherMetrics(Protocol):
    """What the batcher reports (implemented by ``server.metrics.ServerMetrics``); must not block."""

    def request_started(self, model: str, queue_wait_s: float) -> None: ...

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None: ...

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None: ...

    def out_of_memory(self, model: str, what: str, rows: int) -> None: ...

    def images_filtered(self, model: str, images: int) -> None: ...


class NullBatcherMetrics:
    def request_started(self, model: str, queue_wait_s: float) -> None:
        pass

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None:
        pass

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None:
        pass

    def out_of_memory(self, model: str, what: str, rows: int) -> None:
        pass

    def images_filtered(self, model: str, images: int) -> None:
        pass


class _ModelMetrics:
    """The pipeline's shared-work hooks (a ``BatchObserver``), labelled by model."""

    def __init__(self, model: str, metrics: BatcherMetrics) -> None:
        self._model = model
        self._metrics = metrics

    def on_denoise_step(self, requests: int, images: int, seconds: float) -> None:
        self._metrics.denoise_step(self._model, requests, images, seconds)

    def on_out_of_memory(self, network: str, rows: int) -> None:
        self._metrics.out_of_memory(self._model, network, rows)

    def on_images_filtered(self, images: int) -> None:
        self._metrics.images_filtered(self._model, images)


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
    """One accepted request: what the worker runs and how its outcome reaches the caller.

    It is also the request's ``JobObserver``: the pipeline asks it whether to
    stop and tells it about progress.
    """

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
        self.state: RequestState | None = None  # while it is in the running set
        self.outcome: asyncio.Future[GenerationResult] = loop.create_future()
        # A caller that went away never reads its outcome; retrieve it so asyncio does not complain.
        self.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._cancelled = threading.Event()
        self._abort: BaseException | None = None
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
        self._emit(info)

    def on_step(self, info: StepInfo) -> None:
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


class Batcher:
    def __init__(self, settings: BatcherSettings | None = None, metrics: BatcherMetrics | None = None) -> None:
        self.settings = settings or BatcherSettings()
        self.metrics: BatcherMetrics = metrics or NullBatcherMetrics()
        self._pending: deque[RequestHandle] = deque()
        # Started requests whose next pass has another latent shape than the running set's; before the queue.
        self._resuming: deque[RequestHandle] = deque()
        self._running: list[RequestHandle] = []  # only the worker changes it, under the lock
        self._group: Hashable = None  # what the running set's members share (``_group_of``)
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abort: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="diffusiond-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def continuous(self) -> bool:
        return self.settings.batching is Batching.CONTINUOUS

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> list[RequestHandle]:
        """The requests in the running set now."""
        with self._cond:
            return list(self._running)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._running and not self._resuming

    def _busy(self) -> bool:
        """Whether started work is ahead of the queue (lock held)."""
        return bool(self._running or self._resuming)

    def submit(self, handle: RequestHandle) -> int:
        """Queue a request; return how many requests are ahead of it (a running set counts as one)."""
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down and accepts no new requests")
            if len(self._pending) >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({len(self._pending)} of {self.settings.max_queue} places "
                    "taken); retry later"
                )
            position = len(self._pending) + (1 if self._busy() else 0)
            self._pending.append(handle)
            self._cond.notify_all()
        handle.queued(position)
        return position

    def cancel(self, handle: RequestHandle) -> None:
        """The caller went away: a queued (or resuming) request leaves now, a running one at its next step."""
        handle.cancel()
        with self._cond:
            resuming = handle in self._resuming
            try:
                (self._resuming if resuming else self._pending).remove(handle)
            except ValueError:
                return  # running, finished, or never queued
            handle.state = None
            self._cond.notify_all()
        reason = handle.stop_reason() or Cancelled(f"request {handle.request.request_id} was cancelled")
        log.info("req=%s left the %s: %s", handle.request.request_id, "resuming line" if resuming else "queue", reason)
        if resuming:
            self._resolve(handle, reason)  # it had started: its metrics end too
        else:
            handle.resolve(reason)
        self._publish_positions()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until queued and running work is done; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running or self._resuming:
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
            resuming = list(self._resuming)
            self._resuming.clear()
            running = list(self._running)
            self._cond.notify_all()
        for handle in running:
            handle.abort(Unavailable(f"request {handle.request.request_id} was stopped: {reason}"))
        for handle in resuming:
            handle.state = None
            self._resolve(handle, Unavailable(f"request {handle.request.request_id} was stopped: {reason}"))
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
            admitted = self._admit()
            if admitted is None:
                return
            try:
                self._run_one_step(admitted)
            except Exception:  # never let the worker die: the server must go on serving
                log.exception("the batcher failed; failing the requests it was running")
                for handle in self.running:
                    self._retire(handle, Unavailable(f"request {handle.request.request_id} failed in the batcher"))

    def _run_one_step(self, admitted: list[RequestHandle]) -> None:
        for handle in admitted:
            self._start(handle)
        self._move_strays()  # a hi-res request whose first pass has no steps starts at its second size
        self._publish_positions()
        for handle in self.running:  # cancelled, past the deadline, or aborted: out before the step
            reason = handle.stop_reason()
            if reason is not None:
                self._retire(handle, reason)
        running = self.running
        if not running:
            return
        model = running[0].model
        states = [handle.state for handle in running if handle.state is not None]
        try:
            model.pipeline.step(states, _ModelMetrics(model.name, self.metrics))
        except Exception as exc:  # a backend failure or a bug: these requests fail, the server goes on
            log.exception("a denoising step of req=%s failed", ",".join(h.request.request_id for h in running))
            for handle in running:
                self._retire(handle, exc)
            return
        for handle in running:
            state = handle.state
            if state is not None and not state.active:
                self._finish(handle, state)
        self._move_strays()
        if not self._busy_now():  # drained: whatever ran out of memory is gone too
            model.pipeline.forget_row_limits()

    def _busy_now(self) -> bool:
        with self._cond:
            return self._busy()

    def _move_strays(self) -> None:
        """Running requests whose pass now has another latent shape than the set's wait, before the queue,
        for a set of theirs."""
        for handle in self.running:
            state = handle.state
            if state is None or self._group_of(handle) == self._group:
                continue
            with self._cond:
                self._running.remove(handle)
                self._resuming.append(handle)
            log.info("req=%s resumes at %dx%d after step %d", handle.request.request_id, state.current.width,
                     state.current.height, state.steps_done)

    def _admit(self) -> list[RequestHandle] | None:
        """Requests to add to the running set at this step boundary; None when the worker should stop.

        Blocks while nothing runs and nothing is queued.
        """
        with self._cond:
            if not self._running:
                while not self._pending and not self._resuming:
                    if self._stopping:
                        return None
                    self._cond.wait()
                return self._form_batch()
            if not self.continuous:
                return []
            return self._take_joiners(self._group, self._running_images())

    def _running_images(self) -> int:
        return sum(handle.images for handle in self._running)

    def _form_batch(self) -> list[RequestHandle]:
        """A new running set around the oldest waiting request, resuming ones first (called with the lock held)."""
        first = self._resuming.popleft() if self._resuming else self._pending.popleft()
        self._group = self._group_of(first)
        batch, images = [first], first.images
        limit = self.settings.max_batch_size
        # The delay counts from the oldest request's arrival: one that already waited behind
        # a running set does not wait again.
        give_up = first.enqueued_at + self.settings.max_batch_delay_ms / 1000.0
        while images < limit:
            joiners = self._take_joiners(self._group, images)
            batch += joiners
            images += sum(handle.images for handle in joiners)
            remaining = give_up - time.monotonic()
            if images >= limit or remaining <= 0 or self._stopping or self._abort is not None:
                break
            self._cond.wait(remaining)
        return batch

    def _group_of(self, handle: RequestHandle) -> Hashable:
        """Which running set a request may be in: its latent shape now (continuous), and also the same
        timesteps and pass (static). A started request's state says where it is; a hi-res pass moves it."""
        state = handle.state
        request = handle.request
        shape = request.latent_group() if state is None else state.latent_group()
        if self.continuous:
            return shape
        return (shape, request.static_group(), 0 if state is None else state.current.first_step)

    def _take_joiners(self, group: Hashable, images: int) -> list[RequestHandle]:
        """Waiting requests that may join a set of ``group`` holding ``images`` images (lock held).

        Resuming requests come first, then the queue. Continuous: oldest first, stopping at the
        first one that cannot join (first come, first served). Static: any compatible request that
        fits, from anywhere.
        """
        limit = self.settings.max_batch_size
        joiners = []
        for line in (self._resuming, self._pending):
            for handle in list(line):
                fits = images + handle.images <= limit and self._group_of(handle) == group
                if fits:
                    line.remove(handle)
                    joiners.append(handle)
                    images += handle.images
                elif self.continuous:
                    return joiners
        return joiners

    def _start(self, handle: RequestHandle) -> None:
        """Prepare a request (prompt encoding, noise) and add it to the running set; a resuming one
        goes back in as it is."""
        reason = handle.stop_reason()
        if handle.state is not None:
            if reason is not None:
                self._retire(handle, reason)
            else:
                with self._cond:
                    self._running.append(handle)
            return
        if reason is not None:
            log.info("req=%s not run: %s", handle.request.request_id, reason)
            handle.resolve(reason)
            return
        handle.started_at = time.monotonic()
        model = handle.model
        self.metrics.request_started(model.name, handle.started_at - handle.enqueued_at)
        request = handle.request
        log.info("req=%s started (%d running): %dx%d, %d steps of %s%s", request.request_id,
                 len(self._running) + 1, request.width, request.height, request.steps, request.scheduler,
                 "" if request.hires is None else f", then {request.hires.width}x{request.hires.height}")
        try:
            handle.state = model.pipeline.prepare(request, handle)
        except Exception as exc:
            if not isinstance(exc, DiffusiondError):
                log.exception("req=%s failed while preparing", request.request_id)
            self._resolve(handle, exc)
            return
        with self._cond:
            self._running.append(handle)

    def _finish(self, handle: RequestHandle, state: RequestState) -> None:
        """Decode a request that has taken its last step (or take the reason it stopped) and resolve it."""
        try:
            outcome: GenerationResult | BaseException = handle.model.pipeline.finish(
                state, _ModelMetrics(handle.model.name, self.metrics)
            )
        except Exception as exc:
            if exc is not state.error and not isinstance(exc, DiffusiondError):
                log.exception("req=%s failed while decoding", handle.request.request_id)
            outcome = exc
        self._retire(handle, outcome)

    def _retire(self, handle: RequestHandle, outcome: GenerationResult | BaseException) -> None:
        with self._cond:
            if handle in self._running:
                self._running.remove(handle)
            handle.state = None
            self._cond.notify_all()
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

    def _publish_positions(self) -> None:
        with self._cond:
            waiting = list(self._pending)
            ahead = 1 if self._busy() else 0
        for position, handle in enumerate(waiting, start=ahead):
            handle.queued(position)
