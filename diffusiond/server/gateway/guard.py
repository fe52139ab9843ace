"""What every HTTP call passes before any work, as every gRPC call does in the interceptor.

The same bearer tokens, the same per-client limits (a client's gRPC and HTTP
calls count together), the same call tracking (a draining server waits for
HTTP calls too) and the same request metrics, with ``http:`` before the method.
"""

from __future__ import annotations

import time

import grpc
from starlette.requests import Request

from diffusiond.server.auth import TokenStore, authenticate
from diffusiond.server.interceptor import ANONYMOUS, CallInfo, CallTracker
from diffusiond.server.limits import ClientLimits
from diffusiond.server.metrics import ServerMetrics


class Guard:
    def __init__(
        self,
        calls: CallTracker,
        metrics: ServerMetrics | None = None,
        tokens: TokenStore | None = None,
        limits: ClientLimits | None = None,
    ) -> None:
        self.calls = calls
        self.metrics = metrics
        self.tokens = tokens
        self.limits = limits

    def begin(self, method: str) -> CallInfo:
        """Track a call; every ``begin`` needs its ``finish``, however the call ends."""
        self.calls.begin()
        return CallInfo(f"http:{method}", code=grpc.StatusCode.CANCELLED)  # until it ends otherwise

    def admit(self, call: CallInfo, request: Request, limited: bool) -> None:
        """Authenticate, and for generation calls take a place within the client's limits."""
        call.client = authenticate(self.tokens, request.headers.items(), ANONYMOUS)
        if limited and self.limits is not None and self.limits.settings.enabled:
            key = call.client if self.tokens is not None else (request.client.host if request.client else "unknown")
            self.limits.acquire(key)
            call.limited_as = key

    def finish(self, call: CallInfo) -> None:
        if call.limited_as is not None and self.limits is not None:
            self.limits.release(call.limited_as)
            call.limited_as = None
        if self.metrics is not None:
            self.metrics.rpc_finished(call.method, call.code.name, call.client, time.perf_counter() - call.started)
        self.calls.end()
