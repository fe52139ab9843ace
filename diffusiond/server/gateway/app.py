"""The gateway's routes, as one Starlette application over a ``GenerationService``.

- ``POST /v1/images/generations``: OpenAI's images API (``openai_images``).
- ``POST /v1/generate``: a GenerateRequest as JSON -> GenerateResponse as JSON.
- ``POST /v1/generate/stream`` (JSON body) or ``GET /v1/generate/stream`` (query
  parameters): Server-Sent Events ``queued``, ``started``, ``step``, ``result``,
  or ``error`` if the request fails once its stream has begun.
- ``GET /v1/models``: ListModelsResponse as JSON (and OpenAI's model list).
- ``GET /healthz``: 200 while the process serves HTTP; ``GET /readyz``: 200 once
  the models are loaded, 503 while loading or draining. Neither needs a token.
- ``GET /``: the web page (``static/``), which needs no token to load.

A failure before a stream begins is a JSON error with the HTTP status of its
gRPC code (``errors``). A client that disconnects cancels its request, which
stops its denoising at the next step, as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TypeVar

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.errors import Cancelled, InvalidArgument
from diffusiond.server.gateway import messages, openai_images
from diffusiond.server.gateway.errors import error_response, failure
from diffusiond.server.gateway.guard import Guard
from diffusiond.server.interceptor import CallInfo
from diffusiond.server.status import http_status_for
from diffusiond.service.generation import GenerationService, ProgressEvent
from diffusiond.service.resolver import GenerationParams

T = TypeVar("T")
Handler = Callable[[Request, CallInfo], Awaitable[Response]]

STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page loads only its own script and style, and shows images from data: URLs.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy may hold events back


def _static(name: str) -> bytes:
    return (resources.files("diffusiond.server.gateway") / "static" / name).read_bytes()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (call once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or Cancelled (and ``work`` cancelled, so its request leaves the batcher)
    when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise Cancelled("the client disconnected before its request finished")
    finally:
        watcher.cancel()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # its cleanup (withdrawing the request) runs before the call is counted as ended


class EventStream:
    """A Server-Sent Events response that ends its events (and so the request's work) when the client leaves,
    and finishes the call however the stream ends."""

    def __init__(
        self, frames: AsyncIterator[bytes], headers: dict[str, str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        self.frames = frames
        self.headers = {"content-type": "text/event-stream; charset=utf-8", **SSE_HEADERS, **headers}
        self.on_close = on_close  # runs however the stream ends, even if it never began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]})
            await until_disconnected(receive, self._send_all(send))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (Cancelled, OSError):
            pass  # the client left: nothing more to send
        finally:
            with contextlib.suppress(Exception):
                await self.frames.aclose()  # type: ignore[attr-defined]
            await self.on_close()

    async def _send_all(self, send: Send) -> None:
        async for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})


class Gateway:
    """The routes over one service; ``guard`` admits every call under /v1."""

    def __init__(self, service: GenerationService, guard: Guard, max_body_bytes: int) -> None:
        self.service = service
        self.guard = guard
        self.max_body_bytes = max_body_bytes

    def app(self) -> Starlette:
        routes = [
            Route("/v1/images/generations", self._unary("ImagesGenerations", self.images, limited=True), methods=["POST"]),
            Route("/v1/generate", self._unary("Generate", self.generate, limited=True), methods=["POST"]),
            Route("/v1/generate/stream", self.stream, methods=["GET", "POST"]),
            Route("/v1/models", self._unary("ListModels", self.models, limited=False), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            *(Route(path, self._page(name, media), methods=["GET"]) for path, (name, media) in STATIC_FILES.items()),
        ]
        return Starlette(routes=routes)

    # -- calls ---------------------------------------------------------------------------

    def _unary(self, method: str, handler: Handler, limited: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            call = self.guard.begin(method)
            try:
                self.guard.admit(call, request, limited)
                response = await handler(request, call)
                call.code = grpc.StatusCode.OK
                return response
            except Exception as exc:
                call.code, body = failure(exc, f"req={call.request_id} client={call.client} {call.method}",
                                          call.request_id)
                return JSONResponse(body, status_code=http_status_for(call.code), headers=_id_header(call))
            finally:
                self.guard.finish(call)

        return endpoint

    async def generate(self, request: Request, call: CallInfo) -> Response:
        message = messages.generate_request(messages.parse_json(await self._body(request)))
        params = self._params(message, request, call)
        result = await until_disconnected(request.receive, self.service.generate(params))
        return JSONResponse(messages.result_json(result), headers=_id_header(call))

    async def images(self, request: Request, call: CallInfo) -> Response:
        message = openai_images.request_from_openai(messages.parse_json(await self._body(request)))
        params = self._params(message, request, call)
        result = await until_disconnected(request.receive, self.service.generate(params))
        return JSONResponse(openai_images.response_to_openai(result), headers=_id_header(call))

    async def models(self, request: Request, call: CallInfo) -> Response:
        return JSONResponse(messages.models_json(self.service.models()))

    async def stream(self, request: Request) -> Response | EventStream:
        """Checks and the request's first event come before the stream, so they can fail with a status."""
        call = self.guard.begin("StreamProgress")
        events: AsyncIterator[ProgressEvent] | None = None
        try:
            self.guard.admit(call, request, limited=True)
            if request.method == "GET":
                message = messages.query_request(request.query_params.multi_items())
            else:
                message = messages.generate_request(messages.parse_json(await self._body(request)))
            params = self._params(message, request, call)
            events = self.service.stream(params)
            first = await until_disconnected(request.receive, events.__anext__())
        except Exception as exc:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
            call.code, body = failure(exc, f"req={call.request_id} client={call.client} {call.method}", call.request_id)
            self.guard.finish(call)
            return JSONResponse(body, status_code=http_status_for(call.code), headers=_id_header(call))
        except BaseException:
            self.guard.finish(call)
            raise

        async def close() -> None:
            await events.aclose()  # type: ignore[attr-defined]  # withdraws the request if it is still queued or running
            self.guard.finish(call)

        return EventStream(self._frames(call, first, events), _id_header(call) or {}, close)

    async def _frames(self, call: CallInfo, first: ProgressEvent, events: AsyncIterator[ProgressEvent]) -> AsyncIterator[bytes]:
        try:
            yield messages.sse_frame(*messages.event_json(call.request_id, first))
            async for event in events:
                yield messages.sse_frame(*messages.event_json(call.request_id, event))
            call.code = grpc.StatusCode.OK
        except Exception as exc:
            call.code, body = failure(exc, f"req={call.request_id} client={call.client} {call.method}", call.request_id)
            yield messages.sse_frame("error", body)

    # -- health and the page -------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def readyz(self, request: Request) -> Response:
        try:
            self.service.check_accepting()
        except Exception as exc:
            return error_response(grpc.StatusCode.UNAVAILABLE, str(exc))
        return JSONResponse({"status": "ready", "models": [model.name for model, _ in self.service.models()]})

    def _page(self, name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
        content = _static(name)

        async def page(request: Request) -> Response:
            return Response(content, media_type=media_type, headers=PAGE_HEADERS)

        return page

    # -- helpers -------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The body, refused once it is longer than a gRPC request may be (``--max-receive-message-mb``)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidArgument("request", f"the body has {int(declared)} bytes; this server accepts at most {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise InvalidArgument("request", f"the body is longer than the {limit} bytes this server accepts")
        return bytes(body)

    def _params(self, message: pb.GenerateRequest, request: Request, call: CallInfo) -> GenerationParams:
        call.request_id = "-"  # until the id is checked, so an invalid one is not echoed
        params = messages.params_of(message, request.headers.items(), call.client)
        call.request_id = params.request_id
        return params


def _id_header(call: CallInfo) -> dict[str, str] | None:
    return {"x-request-id": call.request_id} if call.request_id != "-" else None
