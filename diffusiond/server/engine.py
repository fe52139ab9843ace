"""The request engine: a bounded queue and one worker thread that runs batches.

The servicer (asyncio) hands each accepted request to the engine as a
``RequestHandle``; the worker thread takes compatible requests off the queue
(same model, size, steps, scheduler; up to ``max_batch_size``, waiting at most
``max_batch_delay_ms`` for company), runs them through the model's pipeline and
resolves each handle. Progress flows back to the event loop through the
handle's ``EventChannel``, which never blocks the worker: a slow streaming
client may miss intermediate previews, never a step event or its result.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from diffusiond.errors import Cancelled, DeadlineExceeded, DiffusiondError, ResourceExhausted, Unavailable
from diffusiond.models.registry import LoadedModel
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, PreviewKind, StartInfo, StepInfo
from diffusiond.pipeline.text2img import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedInfo:
    position: int


@dataclass(frozen=True)
class EngineSettings:
    max_queue: int = 64
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0
    # Unsent previews a streaming client may have buffered before older ones are dropped.
    max_buffered_previews: int = 2


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
        self._cancelled = threading.Event()

    # -- called from the event loop -------------------------------------------

    def cancel(self) -> None:
        """The client went away: stop at the next step, or never start."""
        self._cancelled.set()

    def wait_cancelled(self, timeout: float) -> bool:
        return self._cancelled.wait(timeout)

    # -- called from the worker thread (JobObserver) ----------------------------

    def stop_reason(self) -> BaseException | None:
        if self._cancelled.is_set():
            return Cancelled(f"request {self.request.request_id} was cancelled by the client")
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded(f"request {self.request.request_id} ran past its deadline")
        return None

    def on_started(self, info: StartInfo) -> None:
        self.started_at = time.monotonic()
        self._emit(info)

    def on_step(self, info: StepInfo) -> None:
        self._emit(info)

    def queued(self, position: int) -> None:
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
    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self._pending: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._busy = False
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
        """Queue a request; return how many requests are ahead of it."""
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down and accepts no new requests")
            if len(self._pending) >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({self.settings.max_queue} requests waiting); retry later"
                )
            position = len(self._pending) + (1 if self._busy else 0)
            self._pending.append(handle)
            self._cond.notify_all()
        handle.queued(position)
        return position

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

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop the worker; requests still queued fail with UNAVAILABLE (never dropped silently)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            leftovers = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for handle in leftovers:
            handle.resolve(Unavailable(f"request {handle.request.request_id} was not run: {reason}"))
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
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _next_batch(self) -> list[RequestHandle] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch = [first]
            key = first.request.batch_key()
            give_up = time.monotonic() + self.settings.max_batch_delay_ms / 1000.0
            while len(batch) < self.settings.max_batch_size:
                for handle in list(self._pending):
                    if len(batch) < self.settings.max_batch_size and handle.request.batch_key() == key:
                        self._pending.remove(handle)
                        batch.append(handle)
                remaining = give_up - time.monotonic()
                if len(batch) >= self.settings.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._busy = True
            waiting = list(self._pending)
        for position, handle in enumerate(waiting, start=1):
            handle.queued(position)
        runnable = []
        for handle in batch:
            reason = handle.stop_reason()
            if reason is not None:
                log.info("req=%s not run: %s", handle.request.request_id, reason)
                handle.resolve(reason)
            else:
                runnable.append(handle)
        return runnable

    def _run(self, batch: list[RequestHandle]) -> None:
        model = batch[0].model
        ids = ",".join(h.request.request_id for h in batch)
        log.info("running batch of %d on %s: req=%s", len(batch), model.name, ids)
        self.running = batch
        try:
            outcomes: list[Any] = model.pipeline.run([Job(h.request, h) for h in batch])
        except DiffusiondError as exc:
            outcomes = [exc] * len(batch)
        except Exception as exc:  # a bug or a backend failure: the server keeps serving
            log.exception("batch req=%s failed", ids)
            outcomes = [exc] * len(batch)
        finally:
            self.running = []
        for handle, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                log.info("req=%s ended: %s: %s", handle.request.request_id, type(outcome).__name__, outcome)
            else:
                log.info(
                    "req=%s done in %.2fs (%d steps)",
                    handle.request.request_id, outcome.timings.total_s, handle.request.steps,
                )
            handle.resolve(outcome)
