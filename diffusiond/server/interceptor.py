"""The one server interceptor every Diffusion RPC passes through.

It holds what every method shares, so the servicer holds none of it:

- call tracking: the RPCs in flight, so a draining server knows when every
  accepted request has been answered;
- the exception -> status mapping (``status.status_for``): a ``DiffusiondError``
  becomes its status with its message, anything else is a bug, logged with its
  traceback and answered INTERNAL without internals;
- metrics: every RPC's final status code and duration;
- the request id in the log line of a failed call (the servicer names it in
  ``CallInfo`` once it has read it).

Health checking and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.server.metrics import ServerMetrics
from diffusiond.server.status import status_for

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name


@dataclass
class CallInfo:
    """What the interceptor knows about the call in progress; the servicer fills in the request id."""

    method: str
    request_id: str = "-"
    code: grpc.StatusCode = grpc.StatusCode.OK
    started: float = field(default_factory=time.perf_counter)


current_call: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("diffusiond_call")


class CallTracker:
    """RPCs in flight; ``wait_idle`` lets shutdown wait until all have been answered."""

    def __init__(self) -> None:
        self.active = 0
        self._idle: asyncio.Event | None = None

    def begin(self) -> None:
        self.active += 1
        if self._idle is not None:
            self._idle.clear()

    def end(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

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


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, calls: CallTracker, metrics: ServerMetrics | None = None) -> None:
        self.calls = calls
        self._metrics = metrics
        self._prefix = f"/{SERVICE_NAME}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or not method_path.startswith(self._prefix):
            return handler
        method = method_path[len(self._prefix) :]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = self._begin(method)
            try:
                response = await behavior(request, context)
                self._record(call)
                return response
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self.calls.end()

        return unary

    def _stream(self, method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(method)
            try:
                async for item in behavior(request, context):
                    yield item
                self._record(call)
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self.calls.end()

        return stream

    def _begin(self, method: str) -> CallInfo:
        call = CallInfo(method)
        current_call.set(call)
        self.calls.begin()
        return call

    def _record(self, call: CallInfo) -> None:
        """Count the call with its final status, before the client can see that status."""
        if self._metrics is not None:
            self._metrics.rpc_finished(call.method, call.code.name, time.perf_counter() - call.started)

    async def _fail(self, call: CallInfo, exc: BaseException, context: grpc.aio.ServicerContext) -> NoReturn:
        """Record how the call ended; answer an exception with the status the table gives it."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client left, or the deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._record(call)
            raise exc
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            call.code = grpc.StatusCode.UNKNOWN
            self._record(call)
            raise exc
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("req=%s %s failed with an internal error", call.request_id, call.method, exc_info=exc)
            message = f"internal error while serving request {call.request_id}; the server log has details"
        else:
            log.info("req=%s %s -> %s: %s", call.request_id, call.method, code.name, exc)
            message = str(exc)
        call.code = code
        self._record(call)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises
