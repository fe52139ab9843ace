"""The gRPC servicer: protobuf in -> validated request -> engine -> protobuf out.

It owns no algorithm and no error policy: validation lives in
``validation.py``, status codes in ``status.py``, the work in the engine.
It counts the RPCs in flight, so a draining server knows when every accepted
request has been answered, and reports each RPC's status to the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.api.v1 import diffusion_pb2_grpc as pb_grpc
from diffusiond.errors import Unavailable
from diffusiond.models.registry import LoadedModel, ModelRegistry
from diffusiond.pipeline.request import GenerationRequest, StartInfo, StepInfo
from diffusiond.server import convert
from diffusiond.server.engine import Engine, EventChannel, QueuedInfo, RequestHandle
from diffusiond.server.metrics import ServerMetrics
from diffusiond.server.result_cache import CachedResult, ResultCache, ResultKey, result_key
from diffusiond.server.status import status_for
from diffusiond.server.validation import request_id_of, to_generation_request

log = logging.getLogger(__name__)


class _Abort(Exception):
    """Carries a status out of the error guard, so it is raised outside of it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@contextlib.contextmanager
def _errors_to_status(method: str, request_id: str) -> Iterator[None]:
    """Turn a raised exception into the status the table says, logging bugs with their traceback."""
    try:
        yield
    except (asyncio.CancelledError, _Abort):
        raise
    except Exception as exc:
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("req=%s %s failed with an internal error", request_id, method)
            message = f"internal error while serving request {request_id}; the server log has details"
        else:
            log.info("req=%s %s -> %s: %s", request_id, method, code.name, exc)
            message = str(exc)
        raise _Abort(code, message) from exc


class _CallTracker:
    """RPCs in flight, and each one's final status for the metrics."""

    def __init__(self, metrics: ServerMetrics | None) -> None:
        self._metrics = metrics
        self.active = 0
        self._idle: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def track(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_CallStatus]:
        status = _CallStatus()
        self.active += 1
        if self._idle is not None:
            self._idle.clear()
        started = time.perf_counter()
        try:
            yield status
        except _Abort as abort:
            status.code = abort.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            status.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            status.code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()
            if self._metrics is not None:
                self._metrics.rpc_finished(method, status.code.name, time.perf_counter() - started)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no RPC is in flight; False if ``timeout`` passed first."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self.active == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return self.active == 0
        return True


class _CallStatus:
    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK


class DiffusionServicer(pb_grpc.DiffusionServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        engine: Engine,
        metrics: ServerMetrics | None = None,
        result_cache: ResultCache | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.result_cache = result_cache
        self.calls = _CallTracker(metrics)
        self.ready = False  # set once models are loaded and warmed up
        self.draining = False  # set on shutdown: new calls get UNAVAILABLE

    # -- RPCs -----------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        request_id = request.request_id or "-"
        try:
            async with self.calls.track("Generate", context):
                with _errors_to_status("Generate", request_id):
                    request_id = request_id_of(request, context.invocation_metadata() or ())
                    model, validated = self._validate(request, request_id)
                    key = self._cache_key(request, validated, model)
                    cached = self._cached(key)
                    if cached is not None:
                        return convert.cached_response(validated, model, cached)
                    handle = self._submit(validated, model, context, stream=False)
                    try:
                        result = await handle.outcome
                    finally:
                        self.engine.cancel(handle)  # no-op once finished; stops the work if this call ended
                    response = await asyncio.to_thread(convert.response_for, result, handle.model)
                    self._remember(key, response)
                    return response
        except _Abort as abort:
            await context.abort(abort.code, abort.message)
            raise AssertionError("unreachable")  # context.abort raises

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProgressEvent]:
        request_id = request.request_id or "-"
        try:
            async with self.calls.track("StreamProgress", context):
                with _errors_to_status("StreamProgress", request_id):
                    request_id = request_id_of(request, context.invocation_metadata() or ())
                    model, validated = self._validate(request, request_id)
                    key = self._cache_key(request, validated, model)
                    cached = self._cached(key)
                    if cached is not None:
                        for event in self._cached_events(validated, model, cached):
                            yield event
                        return
                    handle = self._submit(validated, model, context, stream=True)
                    try:
                        async for event in self._progress_events(handle, key):
                            yield event
                    finally:
                        self.engine.cancel(handle)
        except _Abort as abort:
            await context.abort(abort.code, abort.message)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self.calls.track("ListModels", context):
            models = [convert.model_info(m, m.name == self.registry.default_name) for m in self.registry]
            return pb.ListModelsResponse(models=models)

    # -- helpers ----------------------------------------------------------------------

    def _validate(self, msg: pb.GenerateRequest, request_id: str) -> tuple[LoadedModel, GenerationRequest]:
        if self.draining:
            raise Unavailable("the server is shutting down and accepts no new requests; retry on another replica")
        if not self.ready:
            raise Unavailable("the server is still loading its models; retry shortly")
        model = self.registry.get(msg.model)
        return model, to_generation_request(msg, model, request_id)

    def _submit(
        self, request: GenerationRequest, model: LoadedModel, context: grpc.aio.ServicerContext, stream: bool
    ) -> RequestHandle:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        events = EventChannel(self.engine.settings.max_buffered_previews) if stream else None
        handle = RequestHandle(request, model, asyncio.get_running_loop(), deadline, events)
        log.info(
            "req=%s accepted: model=%s %dx%d steps=%d scheduler=%s images=%d seed=%d",
            request.request_id, model.name, request.width, request.height, request.steps,
            request.scheduler, request.num_images, request.seed,
        )
        self.engine.submit(handle)
        return handle

    def _cache_key(self, msg: pb.GenerateRequest, request: GenerationRequest, model: LoadedModel) -> ResultKey | None:
        """Only requests that carry their own seed are cacheable: the others ask for a new image."""
        if self.result_cache is None or not msg.HasField("seed"):
            return None
        return result_key(request, model)

    def _cached(self, key: ResultKey | None) -> CachedResult | None:
        if key is None or self.result_cache is None:
            return None
        return self.result_cache.get(key)

    def _remember(self, key: ResultKey | None, response: pb.GenerateResponse) -> None:
        if key is not None and self.result_cache is not None:
            self.result_cache.put(key, CachedResult.from_response(response))

    def _cached_events(
        self, request: GenerationRequest, model: LoadedModel, cached: CachedResult
    ) -> Iterator[pb.ProgressEvent]:
        """A cache hit streams ``started`` and then ``result``: no queue, no steps, no previews."""
        rid = request.request_id
        log.info("req=%s answered from the result cache", rid)
        total = model.schedulers.total_steps(request.scheduler, request.steps)
        yield pb.ProgressEvent(request_id=rid, started=convert.started_message(request, model, total))
        yield pb.ProgressEvent(request_id=rid, result=convert.cached_response(request, model, cached))

    async def _progress_events(self, handle: RequestHandle, key: ResultKey | None) -> AsyncIterator[pb.ProgressEvent]:
        request = handle.request
        rid = request.request_id
        assert handle.events is not None
        while True:
            item = await handle.events.get()
            if item is None:
                break
            if isinstance(item, QueuedInfo):
                yield pb.ProgressEvent(request_id=rid, queued=pb.Queued(position=item.position))
            elif isinstance(item, StartInfo):
                started = convert.started_message(request, handle.model, item.total_steps)
                yield pb.ProgressEvent(request_id=rid, started=started)
            elif isinstance(item, StepInfo):
                if item.preview is None:
                    step = convert.step_message(item, request)
                else:
                    step = await asyncio.to_thread(convert.step_message, item, request)
                yield pb.ProgressEvent(request_id=rid, step=step)
        result = await handle.outcome  # raises the request's error, if any
        response = await asyncio.to_thread(convert.response_for, result, handle.model)
        self._remember(key, response)
        yield pb.ProgressEvent(request_id=rid, result=response)
