"""Continuous batching with ControlNet rows, on the scripted backend (no model, no RPC): requests with the same
ControlNet share UNet calls, each row with its own control image and scale; others never join them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from fakes import scripted_model
from test_controlnet import png, scene_image

from diffusiond.errors import Cancelled
from diffusiond.pipeline.request import GenerationResult, PreviewKind, StepInfo
from diffusiond.service.batcher import Batcher, BatcherSettings, EventChannel, RequestHandle
from diffusiond.service.control import ControlNetInfo, ControlParams
from diffusiond.service.resolver import GenerationParams, PreviewParams, resolve

WAIT_S = 30.0


def controlled_model():
    model = scripted_model()
    for name in ("edges", "depth"):
        model.backend.attach_controlnet(name, Path("/nowhere"))
        model.controlnets[name] = ControlNetInfo(name, "/nowhere", "canny")
    return model


def handle(model, loop, rid, controlnet=None, index=0, events=False, **fields):
    fields.setdefault("steps", 4)
    fields.setdefault("seed", 1)
    control = None
    if controlnet is not None:
        control = ControlParams(controlnet=controlnet, image=png(scene_image(index)), scale=fields.pop("scale", 1.0))
    request = resolve(GenerationParams(prompt=f"prompt {rid}", request_id=rid, control=control, width=64, height=64,
                                       **fields), model)
    return RequestHandle(request, model, loop, None, EventChannel(16) if events else None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def test_same_controlnet_shares_calls_others_wait_for_their_own_group():
    async def main():
        model = controlled_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=8))
        handles = [
            handle(model, loop, "a", "edges", index=1),
            handle(model, loop, "b", "edges", index=2, scale=0.5, guidance_scale=1.0, steps=3),
            handle(model, loop, "plain"),
            handle(model, loop, "other", "depth", index=3),
        ]
        for h in handles:  # queued before the worker starts, so the grouping is deterministic
            batcher.submit(h)
        batcher.start()
        outcomes = await asyncio.gather(*(h.outcome for h in handles))
        batcher.shutdown()
        return model, outcomes

    model, outcomes = run(main())
    calls = [(c.controlnet, c.rows) for c in model.backend.calls]
    # a (2 rows with guidance) and b (1 row) share 3 steps; then a alone; then the plain one; then depth.
    assert calls == [("edges", 3)] * 3 + [("edges", 2)] + [("", 2)] * 4 + [("depth", 2)] * 4
    assert model.backend.calls[0].control_scales == [1.0, 1.0, 0.5]  # each row its own scale
    assert all(isinstance(o, GenerationResult) for o in outcomes)
    solo = controlled_model()  # a request's image does not depend on its company (the scripted UNet is exact)
    for outcome in outcomes:
        np.testing.assert_array_equal(outcome.images, solo.pipeline.generate(outcome.request).images)


def test_a_cancelled_controlnet_row_leaves_and_the_others_stream_on():
    async def main():
        model = controlled_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=8))
        keep = handle(model, loop, "keep", "edges", index=1, events=True, steps=5,
                      preview=PreviewParams(PreviewKind.APPROX_RGB, every_n_steps=1))
        gone = handle(model, loop, "gone", "edges", index=2, steps=5)

        def cancel_at(number: int) -> None:
            if number == 3:
                gone.cancel()

        model.backend.before_unet = cancel_at
        batcher.submit(keep)
        batcher.submit(gone)
        batcher.start()
        outcomes = await asyncio.gather(keep.outcome, gone.outcome, return_exceptions=True)
        events = []
        while (event := await keep.events.get()) is not None:
            events.append(event)
        batcher.shutdown()
        return model, outcomes, events

    model, (kept, cancelled), events = run(main())
    assert isinstance(kept, GenerationResult) and isinstance(cancelled, Cancelled)
    assert [c.rows for c in model.backend.calls] == [4, 4, 4, 2, 2]  # gone left before the third step
    steps = [e for e in events if isinstance(e, StepInfo)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5]  # streamed step by step, with previews
    assert all(e.preview is not None and len(e.preview) == 1 for e in steps)
