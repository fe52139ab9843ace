"""The engine's batching and recovery rules, with a stand-in pipeline (no model, no RPC)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusiond.errors import Cancelled, ResourceExhausted
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, Timings
from diffusiond.server.engine import Engine, EngineSettings, EventChannel, QueuedInfo, RequestHandle

WAIT_S = 30.0


@dataclass
class FakePipeline:
    """Records the requests of every batch; runs out of memory for batches the test says."""

    batches: list[list[str]] = field(default_factory=list)
    oom_if: object = None  # callable(list of requests) -> bool

    def run(self, jobs, observer=None):
        requests = [job.request for job in jobs]
        self.batches.append([r.request_id for r in requests])
        if self.oom_if is not None and self.oom_if(requests):
            raise MemoryError("out of memory (fake)")
        return [GenerationResult(r, np.zeros((r.num_images, 8, 8, 3)), r.image_seeds(), Timings()) for r in requests]


def fake_model(pipeline: FakePipeline):
    return SimpleNamespace(name="fake", pipeline=pipeline, backend=SimpleNamespace(device=torch.device("cpu")))


def request(rid: str, images: int = 1, steps: int = 4, width: int = 64) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid, model="fake", prompt="p", negative_prompt="", width=width, height=64, steps=steps,
        guidance_scale=7.5, seed=1, num_images=images, scheduler="ddim",
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def test_batches_hold_compatible_requests_up_to_max_images():
    async def main():
        pipeline = FakePipeline()
        engine = Engine(EngineSettings(max_batch_size=4))
        loop = asyncio.get_running_loop()
        handles = [
            RequestHandle(r, fake_model(pipeline), loop)
            for r in (
                request("a", images=2), request("b", steps=8), request("c"), request("d", images=2),
                request("e"), request("big", images=6),
            )
        ]
        for h in handles:  # queued before the worker starts, so batching is deterministic
            engine.submit(h)
        engine.start()
        await asyncio.gather(*(h.outcome for h in handles))
        engine.shutdown()
        return pipeline.batches

    # a+c+e fill 4 images (d would make 5); b has other steps; a request over the limit runs alone.
    assert run(main()) == [["a", "c", "e"], ["b"], ["d"], ["big"]]


def test_batch_delay_counts_from_the_oldest_arrival():
    async def main():
        pipeline = FakePipeline()
        engine = Engine(EngineSettings(max_batch_size=4, max_batch_delay_ms=20_000))
        handle = RequestHandle(request("old"), fake_model(pipeline), asyncio.get_running_loop())
        handle.enqueued_at -= 20.0  # it has already waited the whole delay (behind a running batch, say)
        engine.submit(handle)
        engine.start()
        started = time.monotonic()
        await handle.outcome
        engine.shutdown()
        return time.monotonic() - started

    assert run(main()) < 10.0  # ran without waiting another 20 s for company


def test_out_of_memory_splits_the_batch_until_it_fits():
    async def main():
        pipeline = FakePipeline(oom_if=lambda rs: len(rs) > 1 or rs[0].width > 64)
        engine = Engine(EngineSettings(max_batch_size=8))
        loop = asyncio.get_running_loop()
        model = fake_model(pipeline)
        handles = [RequestHandle(request(rid), model, loop) for rid in "abc"]
        wide = RequestHandle(request("wide", width=128), model, loop)
        after = RequestHandle(request("after", steps=8), model, loop)
        for h in (*handles, wide, after):
            engine.submit(h)
        engine.start()
        outcomes = await asyncio.gather(*(h.outcome for h in (*handles, wide, after)), return_exceptions=True)
        engine.shutdown()
        return pipeline.batches, outcomes

    batches, outcomes = run(main())
    assert batches == [["a", "b", "c"], ["a", "b"], ["a"], ["b"], ["c"], ["wide"], ["after"]]
    assert all(isinstance(o, GenerationResult) for o in outcomes[:3])
    assert isinstance(outcomes[3], ResourceExhausted) and "does not fit" in str(outcomes[3])
    assert isinstance(outcomes[4], GenerationResult)  # the server goes on serving


def test_cancelled_request_leaves_the_queue_at_once():
    async def main():
        pipeline = FakePipeline()
        engine = Engine(EngineSettings(max_queue=2))
        loop = asyncio.get_running_loop()
        channels = [EventChannel(2), EventChannel(2)]
        first, second = (RequestHandle(request(r), fake_model(pipeline), loop, events=c) for r, c in zip("ab", channels))
        assert engine.submit(first) == 0 and engine.submit(second) == 1
        engine.cancel(first)
        assert engine.queue_depth == 1
        with pytest.raises(Cancelled):
            await first.outcome
        await asyncio.sleep(0)  # let the loop deliver the queued events sent from this thread
        positions = [item.position for item in channels[1]._items if isinstance(item, QueuedInfo)]
        engine.start()
        await second.outcome
        engine.shutdown()
        return positions, pipeline.batches

    positions, batches = run(main())
    assert positions == [1, 0]  # moved up when the one ahead left
    assert batches == [["b"]]  # the cancelled request never ran
