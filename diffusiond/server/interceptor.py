"""The one server interceptor every RPC passes through.

It holds what every method shares, so the servicer holds none of it:

- request bytes that are not a valid message get INVALID_ARGUMENT naming the
  message type (gRPC's own handling would answer UNKNOWN and log a traceback);
- authentication (when tokens are configured): every method but health needs
  ``authorization: Bearer <token>``; the token's name identifies the client;
- per-client limits on generation calls (in flight, rate);
- call tracking: the Diffusion RPCs in flight, so a draining server knows when
  every accepted request has been answered;
- the exception -> status mapping (``status.status_for``): a ``DiffusiondError``
  becomes its status with its message (cut to ``MAX_MESSAGE_CHARS`` so the
  status always fits gRPC's header limit), anything else is a bug, logged with
  its traceback and answered INTERNAL without internals;
- metrics: every Diffusion RPC's final status code, client and duration;
- the request id in the log line of a failed call (the servicer names it in
  ``CallInfo`` once it has read it).
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
from diffusiond.errors import InvalidArgument, Unauthenticated
from diffusiond.server.auth import TokenStore, authenticate
from diffusiond.server.limits import ClientLimits, peer_address
from diffusiond.server.metrics import ServerMetrics
from diffusiond.server.status import describe_failure, status_for

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
LIMITED_METHODS = ("Generate", "StreamProgress")  # the calls that take a place in the queue
ANONYMOUS = "-"


@dataclass
class CallInfo:
    """What the interceptor knows about the call in progress; the servicer fills in the request id."""

    method: str
    request_id: str = "-"
    client: str = ANONYMOUS  # the token's name when authentication is on
    limited_as: str | None = None  # the key holding a per-client place, until the call ends
    code: grpc.StatusCode = grpc.StatusCode.OK
    started: float = field(default_factory=time.perf_counter)


current_call: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("diffusiond_call")


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse, so the call can be answered properly."""

    type_name: str
    size: int
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.type_name} ({self.size} bytes: {self.reason[:200]})")


def safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(message_type, "name", "request message")

    def deserialize_or_mark(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, and whatever a parser raises on garbage
            return Undecodable(type_name, len(data), str(exc) or type(exc).__name__)

    return deserialize_or_mark


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


_HANDLER_MAKERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        calls: CallTracker,
        metrics: ServerMetrics | None = None,
        tokens: TokenStore | None = None,
        limits: ClientLimits | None = None,
    ) -> None:
        self.calls = calls
        self.tokens = tokens
        self.limits = limits
        self._metrics = metrics
        self._prefix = f"/{SERVICE_NAME}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        path = handler_call_details.method
        kind = next((k for k in _HANDLER_MAKERS if getattr(handler, k) is not None), None)
        if kind is None:
            return handler
        behavior = getattr(handler, kind)
        if path.startswith(self._prefix):
            wrapped = self._tracked(kind, path[len(self._prefix) :], behavior)
        else:
            wrapped = self._guarded(kind, behavior, needs_token=not path.startswith(HEALTH_PREFIX))
        deserializer = handler.request_deserializer
        return _HANDLER_MAKERS[kind](
            wrapped,
            request_deserializer=safe_deserializer(deserializer) if deserializer is not None else None,
            response_serializer=handler.response_serializer,
        )

    # -- the Diffusion service: every check, tracking, status mapping, metrics --------------

    def _tracked(self, kind: str, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        streaming_in = kind.startswith("stream_")
        if kind.endswith("_unary"):

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = self._begin(method)
                try:
                    request = self._admit(call, request, context, streaming_in)
                    response = await behavior(request, context)
                    self._record(call)
                    return response
                except BaseException as exc:
                    await self._fail(call, exc, context)
                finally:
                    self._end(call)

            return unary

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(method)
            try:
                request = self._admit(call, request, context, streaming_in)
                async for item in behavior(request, context):
                    yield item
                self._record(call)
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self._end(call)

        return stream

    def _begin(self, method: str) -> CallInfo:
        call = CallInfo(method)
        current_call.set(call)
        self.calls.begin()
        return call

    def _admit(self, call: CallInfo, request: Any, context: grpc.aio.ServicerContext, streaming_in: bool) -> Any:
        """The checks before any work: a decodable request, a known token, room within the client's limits."""
        request = _checked(request, streaming_in)
        call.client = self._authenticate(context)
        if self.limits is not None and self.limits.settings.enabled and call.method in LIMITED_METHODS:
            key = call.client if self.tokens is not None else peer_address(context.peer() or "")
            self.limits.acquire(key)
            call.limited_as = key
        return request

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        return authenticate(self.tokens, context.invocation_metadata(), ANONYMOUS)

    def _end(self, call: CallInfo) -> None:
        if call.limited_as is not None and self.limits is not None:
            self.limits.release(call.limited_as)
        self.calls.end()

    def _record(self, call: CallInfo) -> None:
        """Count the call with its final status, before the client can see that status."""
        if self._metrics is not None:
            self._metrics.rpc_finished(call.method, call.code.name, call.client, time.perf_counter() - call.started)

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
        call.code = status_for(exc)
        self._record(call)
        await _abort(context, exc, f"req={call.request_id} client={call.client} {call.method}", call.request_id)

    # -- other services (reflection; health needs no token) --------------------------------

    def _guarded(self, kind: str, behavior: Callable[..., Any], needs_token: bool) -> Callable[..., Any]:
        streaming_in = kind.startswith("stream_")

        def admit(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request = _checked(request, streaming_in)
            if needs_token:
                self._authenticate(context)
            return request

        if kind.endswith("_unary"):

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(admit(request, context), context)
                except (InvalidArgument, Unauthenticated) as exc:
                    await _abort(context, exc, "call", "-")

            return unary

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(admit(request, context), context):
                    yield item
            except (InvalidArgument, Unauthenticated) as exc:
                await _abort(context, exc, "call", "-")

        return stream


def _checked(request: Any, streaming_in: bool) -> Any:
    """The request, or for a request stream an iterator that stops at the first undecodable message."""
    if not streaming_in:
        if isinstance(request, Undecodable):
            raise request.error()
        return request

    async def messages() -> AsyncIterator[Any]:
        async for message in request:
            if isinstance(message, Undecodable):
                raise message.error()
            yield message

    return messages()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, what: str, request_id: str) -> NoReturn:
    code, message = describe_failure(exc, what, request_id)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises
