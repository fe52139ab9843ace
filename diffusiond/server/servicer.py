"""The gRPC servicer: protobuf in -> validated request -> engine -> protobuf out.

It owns no algorithm and no error policy: validation lives in
``validation.py``, status codes in ``status.py``, the work in the engine.
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
from diffusiond.errors import DiffusiondError, Unavailable
from diffusiond.models.registry import ModelRegistry
from diffusiond.pipeline.request import StartInfo, StepInfo
from diffusiond.server import convert
from diffusiond.server.engine import Engine, EventChannel, QueuedInfo, RequestHandle
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


class DiffusionServicer(pb_grpc.DiffusionServicer):
    def __init__(self, registry: ModelRegistry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine
        self.ready = False  # set once models are loaded and warmed up

    # -- RPCs -----------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        request_id = request.request_id or "-"
        try:
            with _errors_to_status("Generate", request_id):
                request_id = request_id_of(request, context.invocation_metadata() or ())
                handle = self._accept(request, request_id, context, stream=False)
                try:
                    result = await handle.outcome
                finally:
                    handle.cancel()  # no-op once finished; stops the work if this call was cancelled
                return await asyncio.to_thread(convert.response_for, result, handle.model)
        except _Abort as abort:
            await context.abort(abort.code, abort.message)
            raise AssertionError("unreachable")  # context.abort raises

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProgressEvent]:
        request_id = request.request_id or "-"
        try:
            with _errors_to_status("StreamProgress", request_id):
                request_id = request_id_of(request, context.invocation_metadata() or ())
                handle = self._accept(request, request_id, context, stream=True)
                try:
                    async for event in self._progress_events(handle):
                        yield event
                finally:
                    handle.cancel()
        except _Abort as abort:
            await context.abort(abort.code, abort.message)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        models = [convert.model_info(m, m.name == self.registry.default_name) for m in self.registry]
        return pb.ListModelsResponse(models=models)

    # -- helpers ----------------------------------------------------------------------

    def _accept(
        self, msg: pb.GenerateRequest, request_id: str, context: grpc.aio.ServicerContext, stream: bool
    ) -> RequestHandle:
        if not self.ready:
            raise Unavailable("the server is still loading its models; retry shortly")
        model = self.registry.get(msg.model)
        request = to_generation_request(msg, model, request_id)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        events = EventChannel(self.engine.settings.max_buffered_previews) if stream else None
        handle = RequestHandle(request, model, asyncio.get_running_loop(), deadline, events)
        log.info(
            "req=%s accepted: model=%s %dx%d steps=%d scheduler=%s images=%d seed=%d",
            request_id, model.name, request.width, request.height, request.steps,
            request.scheduler, request.num_images, request.seed,
        )
        self.engine.submit(handle)
        return handle

    async def _progress_events(self, handle: RequestHandle) -> AsyncIterator[pb.ProgressEvent]:
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
        yield pb.ProgressEvent(request_id=rid, result=response)
