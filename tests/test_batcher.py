"""The batcher's admission, retirement and recovery rules, on a scripted backend (no model, no RPC).

The scripted UNet records the rows and timesteps of every call and can run a
hook before one, so each test scripts exactly when a request arrives or leaves
relative to the steps of the running set.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fakes import out_of_memory_when, scripted_model
from image_inputs import box_mask, encode, picture

from diffusiond.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from diffusiond.pipeline.request import GenerationResult
from diffusiond.service.batcher import Batcher, BatcherSettings, EventChannel, QueuedInfo, RequestHandle
from diffusiond.service.resolver import GenerationParams, resolve

WAIT_S = 30.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def handle_for(model, loop, rid: str, *, events: bool = False, deadline: float | None = None, **fields):
    fields.setdefault("steps", 4)
    fields.setdefault("seed", 1)
    request = resolve(GenerationParams(prompt=f"prompt {rid}", request_id=rid, **fields), model)
    return RequestHandle(request, model, loop, deadline, EventChannel(8) if events else None)


def rows(model) -> list[int]:
    return [call.rows for call in model.backend.calls]


class SubmitAt:
    """A UNet hook that submits handles just before the given call numbers (1-based)."""

    def __init__(self, batcher: Batcher, plan: dict[int, list[RequestHandle]]) -> None:
        self.batcher, self.plan = batcher, plan

    def __call__(self, number: int) -> None:
        for handle in self.plan.pop(number, []):
            self.batcher.submit(handle)


def test_continuous_batching_admits_a_new_request_at_the_next_step():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=4))
        first = handle_for(model, loop, "first", steps=6)
        late = handle_for(model, loop, "late", steps=3, scheduler="euler_a", guidance_scale=1.0)
        model.backend.before_unet = SubmitAt(batcher, {2: [late]})  # arrives while step 2 runs
        batcher.submit(first)
        batcher.start()
        outcomes = await asyncio.gather(first.outcome, late.outcome)
        batcher.shutdown()
        return model, outcomes

    model, (first, late) = run(main())
    # First alone for 2 steps; the late one joins at step 3 and takes 3 steps; first finishes alone.
    assert rows(model) == [2, 2, 3, 3, 3, 2]
    assert isinstance(first, GenerationResult) and isinstance(late, GenerationResult)
    solo = scripted_model()
    np.testing.assert_array_equal(late.images, solo.pipeline.generate(late.request).images)


def test_static_batching_runs_a_batch_to_the_end_before_the_next():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=4, batching="static"))
        first = handle_for(model, loop, "first", steps=4)
        late = handle_for(model, loop, "late", steps=4)
        model.backend.before_unet = SubmitAt(batcher, {2: [late]})
        batcher.submit(first)
        batcher.start()
        await asyncio.gather(first.outcome, late.outcome)
        batcher.shutdown()
        return model

    assert rows(run(main())) == [2] * 8  # the late one waited for the whole first batch


def test_static_batches_group_by_steps_and_scheduler_continuous_by_size_only():
    async def main(batching):
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=8, batching=batching))
        handles = [
            handle_for(model, loop, "a", steps=3),
            handle_for(model, loop, "b", steps=5, scheduler="dpmpp_2m"),
            handle_for(model, loop, "c", steps=3),
            handle_for(model, loop, "wide", steps=3, width=128),
        ]
        for handle in handles:  # queued before the worker starts, so batching is deterministic
            batcher.submit(handle)
        batcher.start()
        await asyncio.gather(*(h.outcome for h in handles))
        batcher.shutdown()
        return rows(model)

    assert run(main("static")) == [4, 4, 4] + [2] * 5 + [2] * 3
    # a, b and c share calls (b runs two steps longer); the wide one needs other latents: it waits.
    assert run(main("continuous")) == [6, 6, 6, 2, 2] + [2] * 3


def test_admission_is_first_come_first_served():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=8))
        running = handle_for(model, loop, "running", steps=4)
        wide = handle_for(model, loop, "wide", steps=2, width=128)
        small = handle_for(model, loop, "small", steps=2)  # could join, but arrived after the wide one
        model.backend.before_unet = SubmitAt(batcher, {1: [wide, small]})
        batcher.submit(running)
        batcher.start()
        await asyncio.gather(running.outcome, wide.outcome, small.outcome)
        batcher.shutdown()
        return rows(model)

    assert run(main()) == [2, 2, 2, 2, 2, 2, 2, 2]  # running alone, then wide alone, then small


def test_a_request_over_the_batch_size_runs_alone_and_capacity_counts_images():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=3))
        handles = [
            handle_for(model, loop, "two", steps=2, num_images=2),
            handle_for(model, loop, "one", steps=2),
            handle_for(model, loop, "big", steps=2, num_images=5),
        ]
        for handle in handles:
            batcher.submit(handle)
        batcher.start()
        await asyncio.gather(*(h.outcome for h in handles))
        batcher.shutdown()
        return rows(model)

    assert run(main()) == [6, 6, 10, 10]


def test_batch_delay_counts_from_the_oldest_arrival():
    async def main():
        model = scripted_model()
        batcher = Batcher(BatcherSettings(max_batch_size=4, max_batch_delay_ms=20_000))
        handle = handle_for(model, asyncio.get_running_loop(), "old")
        handle.enqueued_at -= 20.0  # it has already waited the whole delay (behind a running set, say)
        batcher.submit(handle)
        batcher.start()
        started = time.monotonic()
        await handle.outcome
        batcher.shutdown()
        return time.monotonic() - started

    assert run(main()) < 10.0  # ran without waiting another 20 s for company


def test_cancelled_request_leaves_the_queue_at_once():
    async def main():
        model = scripted_model()
        batcher = Batcher(BatcherSettings(max_queue=2))
        loop = asyncio.get_running_loop()
        first = handle_for(model, loop, "a", events=True)
        second = handle_for(model, loop, "b", events=True)
        assert batcher.submit(first) == 0 and batcher.submit(second) == 1
        batcher.cancel(first)
        assert batcher.queue_depth == 1
        with pytest.raises(Cancelled):
            await first.outcome
        await asyncio.sleep(0)  # let the loop deliver the queued events sent from this thread
        positions = [item.position for item in second.events._items if isinstance(item, QueuedInfo)]
        batcher.start()
        await second.outcome
        batcher.shutdown()
        return positions, rows(model)

    positions, unet_rows = run(main())
    assert positions == [1, 0]  # moved up when the one ahead left
    assert unet_rows == [2] * 4  # the cancelled request never ran


def test_cancel_and_deadline_retire_running_requests_before_the_next_step():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=8))
        stays = handle_for(model, loop, "stays", steps=6)
        cancelled = handle_for(model, loop, "cancelled", steps=6)
        expires = handle_for(model, loop, "expires", steps=6, deadline=time.monotonic() + 3600)

        def script(number: int) -> None:
            if number == 2:
                cancelled.cancel()
            if number == 3:
                expires.deadline = time.monotonic() - 1

        model.backend.before_unet = script
        for handle in (stays, cancelled, expires):
            batcher.submit(handle)
        batcher.start()
        outcomes = await asyncio.gather(stays.outcome, cancelled.outcome, expires.outcome, return_exceptions=True)
        batcher.shutdown()
        return rows(model), outcomes

    unet_rows, (stays, cancelled, expires) = run(main())
    assert unet_rows == [6, 6, 4, 2, 2, 2]
    assert isinstance(stays, GenerationResult)
    assert isinstance(cancelled, Cancelled) and isinstance(expires, DeadlineExceeded)


class RecordingMetrics:
    def __init__(self) -> None:
        self.out_of_memory_calls: list[tuple[str, int]] = []

    def request_started(self, model: str, queue_wait_s: float) -> None:
        pass

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None:
        pass

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None:
        pass

    def out_of_memory(self, model: str, what: str, rows: int) -> None:
        self.out_of_memory_calls.append((what, rows))

    def images_filtered(self, model: str, images: int) -> None:
        pass


def test_a_request_that_does_not_fit_fails_alone_and_the_rest_go_on():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        metrics = RecordingMetrics()
        batcher = Batcher(BatcherSettings(max_batch_size=8), metrics)
        fits = handle_for(model, loop, "fits", steps=3)
        huge = handle_for(model, loop, "huge", steps=3, num_images=3)
        after = handle_for(model, loop, "after", steps=2)
        marker = float(model.pipeline.prompts.encode("prompt huge").hidden_states.mean())
        model.backend.unet_fails = out_of_memory_when(
            lambda sample, context: bool(np.isclose(context.mean(dim=(1, 2)), marker).any())
        )
        for handle in (fits, huge, after):
            batcher.submit(handle)
        batcher.start()
        outcomes = await asyncio.gather(fits.outcome, huge.outcome, after.outcome, return_exceptions=True)
        batcher.shutdown()
        return outcomes, metrics.out_of_memory_calls

    (fits, huge, after), oom = run(main())
    assert isinstance(fits, GenerationResult) and isinstance(after, GenerationResult)
    assert isinstance(huge, ResourceExhausted) and "does not fit" in str(huge)
    assert oom and all(what == "unet" for what, _ in oom)


def test_a_failing_backend_fails_its_requests_and_the_batcher_goes_on():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=1))
        broken = handle_for(model, loop, "broken")
        fine = handle_for(model, loop, "fine")
        model.backend.unet_fails = lambda sample, context: None if fine.started_at else RuntimeError("kernel crashed")
        batcher.submit(broken)
        batcher.submit(fine)
        batcher.start()
        outcomes = await asyncio.gather(broken.outcome, fine.outcome, return_exceptions=True)
        batcher.shutdown()
        return outcomes

    broken, fine = run(main())
    assert isinstance(broken, RuntimeError) and isinstance(fine, GenerationResult)


def test_shutdown_fails_queued_and_running_requests_with_unavailable():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=1))
        running = handle_for(model, loop, "running", steps=50)
        queued = handle_for(model, loop, "queued")
        entered = threading.Event()
        model.backend.before_unet = lambda number: entered.set()
        batcher.submit(running)
        batcher.submit(queued)
        batcher.start()
        await asyncio.to_thread(entered.wait, WAIT_S)
        await asyncio.to_thread(batcher.shutdown)
        return await asyncio.gather(running.outcome, queued.outcome, return_exceptions=True)

    outcomes = run(main())
    assert [type(o).__name__ for o in outcomes] == ["Unavailable", "Unavailable"]
    assert "stopped" in str(outcomes[0]) and "not run" in str(outcomes[1])


def test_image_conditioned_requests_join_a_running_set_of_their_size():
    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=4))
        plain = handle_for(model, loop, "plain", steps=6)
        inpaint = handle_for(model, loop, "inpaint", steps=4, init_image=encode(picture()),
                             mask_image=encode(box_mask()), guidance_scale=1.0)
        model.backend.before_unet = SubmitAt(batcher, {2: [inpaint]})
        batcher.submit(plain)
        batcher.start()
        outcomes = await asyncio.gather(plain.outcome, inpaint.outcome)
        batcher.shutdown()
        return model, outcomes

    model, (plain, inpaint) = run(main())
    assert rows(model) == [2, 2, 3, 3, 3, 3]  # it joined at step 3 and shared every call after
    solo = scripted_model()
    np.testing.assert_array_equal(inpaint.images, solo.pipeline.generate(inpaint.request).images)
