"""Cancelling a call or missing its deadline stops the denoising within one UNet call."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
import pytest

from diffusiond.client import ClientError, build_request

CANCEL_AT_STEP = 3
WAIT_S = 30.0


@dataclass
class Hold:
    start: int
    reached: threading.Event = field(default_factory=threading.Event)

    def calls_since(self, counting) -> int:
        return counting.unet_calls - self.start


@pytest.fixture
def hold(server, counting):
    """Before UNet call ``start + n``, signal ``reached`` and wait until the server has seen a cancel.

    This makes "one call after the cancel" exact instead of a race with the
    network: that call is the one in flight when the cancel lands.
    """

    def arm(n: int) -> Hold:
        state = Hold(counting.unet_calls)

        def hook(call: int) -> None:
            if call == state.start + n:
                state.reached.set()
                running = server.server.batcher.running
                assert running and running[0].wait_cancelled(WAIT_S), "the server never saw the cancel"

        counting.before_unet = hook
        return state

    yield arm
    counting.before_unet = None


def test_cancelled_stream_stops_within_one_step(client, server, counting, hold):
    state = hold(CANCEL_AT_STEP + 1)
    stream = client.stream("a fox", seed=1, steps=50, scheduler="ddim")
    with pytest.raises(ClientError) as info:
        for event in stream:
            if event.WhichOneof("event") == "step" and event.step.step == CANCEL_AT_STEP:
                stream.cancel()
    assert info.value.code is grpc.StatusCode.CANCELLED
    assert server.server.batcher.wait_idle(WAIT_S)
    # Steps 1..3 ran; step 4 ran only if it had started before the cancel landed; nothing after it.
    assert CANCEL_AT_STEP <= state.calls_since(counting) <= CANCEL_AT_STEP + 1
    assert client.generate("a fox", seed=1, steps=2).images  # the next request is served normally


def test_cancelled_generate_stops_within_one_step(client, server, counting, hold):
    state = hold(CANCEL_AT_STEP + 1)
    call = client._stub.Generate.future(build_request("a fox", seed=2, steps=50, scheduler="ddim"), timeout=60)
    assert state.reached.wait(WAIT_S)
    call.cancel()
    assert call.cancelled()
    assert server.server.batcher.wait_idle(WAIT_S)
    assert state.calls_since(counting) == CANCEL_AT_STEP + 1
    assert client.generate("a fox", seed=2, steps=2).images


def test_deadline_stops_the_work(client, server, counting):
    start = counting.unet_calls
    with pytest.raises(ClientError) as info:
        client.generate("a fox", seed=3, steps=200, timeout=0.5)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.server.batcher.wait_idle(WAIT_S)
    assert counting.unet_calls - start < 200  # stopped long before the end
    assert client.generate("a fox", seed=3, steps=2).images
