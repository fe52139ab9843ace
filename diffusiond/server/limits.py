"""Per-client limits: requests in flight and a token-bucket rate, so no client can starve the others.

A client is its token's name when authentication is on, else its network
address (the peer without its port). Each may have at most ``max_inflight``
generation calls queued or running, and may start them at ``rate`` per second
on average with bursts of ``burst``. A call over either limit is refused at
once with RESOURCE_EXHAUSTED naming the limit, before it takes a place in the
shared queue.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from diffusiond.errors import ResourceExhausted

MAX_TRACKED_CLIENTS = 10_000  # idle clients beyond this are forgotten, oldest first


@dataclass(frozen=True)
class ClientLimitSettings:
    max_inflight: int = 0  # 0: no limit
    rate: float = 0.0  # calls per second; 0: no limit
    burst: int = 0  # bucket size; 0: max(1, ceil(rate))

    def __post_init__(self) -> None:
        if self.max_inflight < 0 or self.rate < 0 or self.burst < 0:
            raise ValueError("per-client limits must not be negative")

    @property
    def enabled(self) -> bool:
        return self.max_inflight > 0 or self.rate > 0

    @property
    def bucket_size(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate)))


@dataclass
class _Client:
    inflight: int
    tokens: float
    refilled_at: float


class ClientLimits:
    def __init__(self, settings: ClientLimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, client: str) -> None:
        """Take a place for one call of ``client``; ResourceExhausted when it is over a limit."""
        s = self.settings
        now = self._clock()
        with self._lock:
            state = self._clients.get(client)
            if state is None:
                state = _Client(0, s.bucket_size, now)
                self._clients[client] = state
                self._forget_idle()
            self._clients.move_to_end(client)
            if s.max_inflight and state.inflight >= s.max_inflight:
                raise ResourceExhausted(
                    f"client {client} already has {state.inflight} requests queued or running, the most one "
                    f"client may have (--per-client-max-inflight {s.max_inflight}); wait for one to finish"
                )
            if s.rate:
                state.tokens = min(s.bucket_size, state.tokens + (now - state.refilled_at) * s.rate)
                state.refilled_at = now
                if state.tokens < 1.0:
                    wait = (1.0 - state.tokens) / s.rate
                    raise ResourceExhausted(
                        f"client {client} is over its rate limit (--per-client-rate {s.rate:g} requests/s, "
                        f"bursts of {s.bucket_size:g}); retry in {wait:.2f} s"
                    )
                state.tokens -= 1.0
            state.inflight += 1

    def release(self, client: str) -> None:
        with self._lock:
            state = self._clients.get(client)
            if state is not None and state.inflight > 0:
                state.inflight -= 1

    def _forget_idle(self) -> None:
        while len(self._clients) > MAX_TRACKED_CLIENTS:
            for name, state in self._clients.items():  # oldest first
                if state.inflight == 0:
                    del self._clients[name]
                    break
            else:
                return


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:5000`` -> ``::1``; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or "unknown"
