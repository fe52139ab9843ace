"""Continuous batching end to end: a real server on the built-in model, requests joining and leaving mid-way.

The server admits queued requests at every step boundary. A request that
joins a running one, or shares steps with one that leaves, must get its solo
image up to the batch-size kernel rounding the tests allow everywhere
(``images.assert_same_image``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from conftest import FaultyBackend, running_server
from images import assert_same_image

from diffusiond.client import DiffusionClient, build_request
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.service.batcher import BatcherSettings

WAIT_S = 60.0


@pytest.fixture(scope="module")
def continuous_server(builtin_dir) -> Iterator[ServerThread]:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        models=[ModelSource("builtin", str(builtin_dir))],
        batcher=BatcherSettings(max_batch_size=4, batching="continuous"),
    )
    with running_server(settings, FaultyBackend) as thread:
        yield thread


@pytest.fixture
def faulty(continuous_server) -> Iterator[FaultyBackend]:
    backend = continuous_server.server.registry.get("builtin").pipeline.backend
    backend.reset()
    yield backend
    backend.reset()


def test_requests_join_and_leave_a_running_request_mid_way(continuous_server, client, faulty):
    join_at = threading.Event()
    joined: list[object] = []

    def hold_third_call(sample) -> None:
        if len(faulty.unet_rows) == 2 and not join_at.is_set():  # the long request's third step is starting
            join_at.set()
            assert joined_started.wait(WAIT_S)

    joined_started = threading.Event()
    faulty.before_unet = hold_third_call
    long = dict(prompt="a large red circle on a blue background, top left", seed=11, steps=8, scheduler="ddim")
    short = dict(prompt="a small yellow triangle on a black background", seed=22, steps=3, scheduler="euler_a",
                 guidance_scale=1.0, num_images=2)

    with DiffusionClient(continuous_server.address, timeout=WAIT_S) as c:
        def run_long():
            return list(c.stream(**long))

        def run_short():
            assert join_at.wait(WAIT_S)
            events = c.stream(**short)
            it = iter(events)
            first = next(it)  # queued: it is in the batcher before the held step goes on
            joined_started.set()
            return [first, *it]

        threads = [threading.Thread(target=lambda f=f: joined.append((f.__name__, f()))) for f in (run_long, run_short)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
    results = dict(joined)
    # The long request alone (2 guided rows) for three steps; the short one (2 images, no guidance),
    # queued during the third, joins at the next step boundary for its three steps, leaves, and the
    # long one finishes alone.
    assert faulty.unet_rows == [2, 2, 2, 4, 4, 4, 2, 2]
    long_events, short_events = results["run_long"], results["run_short"]
    assert [e.step.step for e in long_events if e.WhichOneof("event") == "step"] == list(range(1, 9))
    assert [e.step.step for e in short_events if e.WhichOneof("event") == "step"] == [1, 2, 3]
    alone_long = client.generate(**long)
    alone_short = client.generate(**short)
    assert_same_image(long_events[-1].result.images[0].data, alone_long.images[0].data)
    for a, b in zip(short_events[-1].result.images, alone_short.images):
        assert_same_image(a.data, b.data)


def test_a_request_of_another_size_waits_for_the_running_set_to_drain(continuous_server, faulty):
    fields = dict(steps=3, scheduler="ddim", seed=5)
    entered, gate = threading.Event(), threading.Event()

    def hold_first_call(sample) -> None:
        if not entered.is_set():
            entered.set()
            assert gate.wait(WAIT_S)

    faulty.before_unet = hold_first_call
    with DiffusionClient(continuous_server.address, timeout=WAIT_S) as c:
        first = c._stub.Generate.future(build_request("first", **fields), timeout=WAIT_S)
        assert entered.wait(WAIT_S)
        wide = iter(c.stream("wide", width=128, **fields))
        queued = next(wide)
        assert queued.WhichOneof("event") == "queued" and queued.queued.position == 1
        gate.set()
        rest = list(wide)
        assert first.result(WAIT_S).images
    assert rest[-1].result.images[0].width == 128
    # Never in one call: the 64 px request's three steps, then the 128 px one's.
    assert faulty.unet_rows == [2] * 6
