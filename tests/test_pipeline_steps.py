"""The step-at-a-time pipeline on a scripted backend: requests join and leave between steps.

The scripted networks are row-wise and exact, so a request's images must be
bit-identical to its solo run whatever its company: any difference would be
the pipeline mixing state between requests.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes import out_of_memory_when, scripted_model

from diffusiond.errors import Cancelled, ResourceExhausted
from diffusiond.pipeline.observers import NullObserver
from diffusiond.service.resolver import GenerationParams, resolve


@pytest.fixture
def model():
    return scripted_model()


def request(model, prompt: str, **fields):
    fields.setdefault("seed", 7)
    fields.setdefault("steps", 5)
    return resolve(GenerationParams(prompt=prompt, **fields), model)


def solo(model, req) -> np.ndarray:
    fresh = scripted_model()
    return fresh.pipeline.generate(req).images


class StopAfter(NullObserver):
    """Cancels its request once ``steps`` steps are done."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.done = 0

    def on_step(self, info) -> None:
        self.done = info.step

    def stop_reason(self):
        return Cancelled("cancelled by the test") if self.done >= self.steps else None


def test_a_request_joining_mid_way_gets_its_solo_image(model):
    first = request(model, "a red circle", steps=6, scheduler="ddim")
    second = request(model, "a blue square", steps=4, scheduler="euler_a", seed=99, guidance_scale=1.0)
    pipe = model.pipeline
    a = pipe.prepare(first)
    pipe.step([a])
    pipe.step([a])
    b = pipe.prepare(second)  # joins at A's third step
    while a.active or b.active:
        pipe.step([a, b])
    calls = model.backend.calls
    # A alone (2 guided rows) for two steps, then A + B (B unguided: 1 row) in one call per step.
    assert [c.rows for c in calls] == [2, 2, 3, 3, 3, 3]
    # Rows of one call carry their own timesteps: A's third step and B's first are different.
    assert len(set(calls[2].timesteps)) == 2
    np.testing.assert_array_equal(pipe.finish(a).images, solo(model, first))
    np.testing.assert_array_equal(pipe.finish(b).images, solo(model, second))


def test_a_request_leaving_mid_way_stops_at_once_and_the_others_go_on(model):
    stays = request(model, "a green tree", steps=5)
    leaves = request(model, "a yellow sun", steps=5, seed=3)
    pipe = model.pipeline
    a, b = pipe.prepare(stays), pipe.prepare(leaves, StopAfter(2))
    while a.active or b.active:
        pipe.step([a, b])
    assert [c.rows for c in model.backend.calls] == [4, 4, 2, 2, 2]
    with pytest.raises(Cancelled):
        pipe.finish(b)
    assert model.backend.decodes == []  # nothing is decoded for a request that has gone
    np.testing.assert_array_equal(pipe.finish(a).images, solo(model, stays))


def test_different_steps_schedulers_and_guidance_share_calls(model):
    requests = [
        request(model, "one", steps=3, scheduler="ddim"),
        request(model, "two", steps=6, scheduler="dpmpp_2m", seed=11, guidance_scale=9.0),
        request(model, "three", steps=4, scheduler="pndm", seed=12, num_images=2),  # PNDM runs 5
        request(model, "four", steps=2, scheduler="euler_a", seed=13, guidance_scale=0.5),
    ]
    outcomes = model.pipeline.generate_together(requests)
    rows = [c.rows for c in model.backend.calls]
    assert rows == [2 + 2 + 4 + 1, 2 + 2 + 4 + 1, 2 + 2 + 4, 2 + 4, 2 + 4, 2]
    for req, outcome in zip(requests, outcomes):
        np.testing.assert_array_equal(outcome.images, solo(model, req))


def test_out_of_memory_splits_rows_and_keeps_the_size_that_fits(model):
    model.backend.unet_fails = out_of_memory_when(lambda sample, context: sample.shape[0] > 2)
    requests = [request(model, "a fox", steps=3), request(model, "a cat", steps=3, seed=8)]
    outcomes = model.pipeline.generate_together(requests)
    # 4 rows ran out, then 2 fit; every later step runs 2 rows at a time from the start.
    assert [c.rows for c in model.backend.calls] == [2, 2] * 3
    for req, outcome in zip(requests, outcomes):
        np.testing.assert_array_equal(outcome.images, solo(model, req))


def test_only_the_request_that_does_not_fit_fails_and_the_others_keep_their_steps(model):
    pipe = model.pipeline
    fits = request(model, "small", steps=4)
    a = pipe.prepare(fits)
    pipe.step([a])
    pipe.step([a])
    huge = request(model, "huge", steps=4, num_images=3)
    b = pipe.prepare(huge)
    marker = float(b.cond.mean())  # B's prompt rows do not fit, not even one at a time
    model.backend.unet_fails = out_of_memory_when(
        lambda sample, context: bool(np.isclose(context.mean(dim=(1, 2)), marker).any())
    )
    while a.active or b.active:
        pipe.step([a, b])
    assert isinstance(b.error, ResourceExhausted) and "does not fit" in str(b.error)
    assert a.steps_done == 4  # A went on from the step it had reached, never from step 0
    np.testing.assert_array_equal(pipe.finish(a).images, solo(model, fits))


def test_decode_that_runs_out_of_memory_decodes_fewer_images_at_a_time(model):
    backend = model.backend
    real_decode = backend.vae_decode

    def decode(latents):
        if latents.shape[0] > 1:
            from diffusiond.errors import OutOfMemory

            raise OutOfMemory("scripted")
        return real_decode(latents)

    backend.vae_decode = decode
    req = request(model, "four images", steps=2, num_images=4)
    result = model.pipeline.generate(req)
    assert backend.decodes == [1, 1, 1, 1]
    np.testing.assert_array_equal(result.images, solo(model, req))


def test_states_of_different_latent_shapes_cannot_share_a_step(model):
    pipe = model.pipeline
    a = pipe.prepare(request(model, "small", width=64))
    b = pipe.prepare(request(model, "wide", width=128))
    with pytest.raises(ValueError, match="latent shape"):
        pipe.step([a, b])


def test_progress_events_count_each_requests_own_steps(model):
    class Recorder(NullObserver):
        def __init__(self):
            self.steps, self.total = [], None

        def on_started(self, info):
            self.total = info.total_steps

        def on_step(self, info):
            self.steps.append((info.step, info.total_steps))

    observers = [Recorder(), Recorder()]
    model.pipeline.generate_together(
        [request(model, "one", steps=3), request(model, "two", steps=5, scheduler="pndm")], observers
    )
    assert observers[0].total == 3 and observers[0].steps == [(1, 3), (2, 3), (3, 3)]
    assert observers[1].total == 6 and [s for s, _ in observers[1].steps] == [1, 2, 3, 4, 5, 6]
