"""Dynamic batching, backpressure, out-of-memory recovery and the result cache, on a real server.

The server here batches up to 4 images and waits up to 30 s for company, so
every test fills its batches exactly (4 images) and never waits on the clock.
Its backend is wrapped in ``FaultyBackend``, which records the rows of every
UNet call, can hold a call, and injects out-of-memory errors.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import FaultyBackend, running_server
from images import assert_same_image

from diffusiond.client import ClientError, DiffusionClient, build_request
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.service.batcher import BatcherSettings

BATCH_IMAGES = 4
MAX_QUEUE = 4
WAIT_S = 60.0


@pytest.fixture(scope="module")
def batch_server(builtin_dir) -> Iterator[ServerThread]:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        models=[ModelSource("builtin", str(builtin_dir))],
        batcher=BatcherSettings(max_queue=MAX_QUEUE, max_batch_size=BATCH_IMAGES, max_batch_delay_ms=30_000),
        result_cache_bytes=8 * 1024 * 1024,
        metrics_port=0,
    )
    with running_server(settings, FaultyBackend) as thread:
        yield thread


@pytest.fixture
def faulty(batch_server) -> Iterator[FaultyBackend]:
    backend = batch_server.server.registry.get("builtin").pipeline.backend
    backend.reset()
    yield backend
    backend.reset()


@pytest.fixture(scope="module")
def bclient(batch_server) -> Iterator[DiffusionClient]:
    with DiffusionClient(batch_server.address, timeout=WAIT_S) as c:
        yield c


def in_parallel(*calls):
    """Run the calls in threads at once; return their results (or exceptions) in order."""
    results: list[object] = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # returned, so the test can assert on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return results


class Gate:
    """A UNet hook that holds every call until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, sample) -> None:
        self.entered.set()
        assert self.open.wait(WAIT_S), "the test never opened the gate"


def kinds(events):
    return [e.WhichOneof("event") for e in events]


def test_batched_requests_match_their_solo_runs(bclient, client, faulty):
    common = dict(steps=6, scheduler="euler_a")
    unary = [
        dict(prompt="a red fox", negative_prompt="blurry", seed=1001, guidance_scale=7.5),
        dict(prompt="a blue house", seed=2002, guidance_scale=3.0),
    ]
    streamed = [
        dict(prompt="a green tree", seed=3003, guidance_scale=1.0, preview="approx_rgb"),  # no guidance
        dict(prompt="a yellow sun", negative_prompt="dark", seed=4004, guidance_scale=12.0, preview="latent"),
    ]
    results = in_parallel(
        *[lambda f=f: bclient.generate(**f, **common) for f in unary],
        *[lambda f=f: list(bclient.stream(**f, **common)) for f in streamed],
    )
    # One batch: 3 requests with guidance (2 rows each) and one without (1 row), for each of 6 steps.
    assert faulty.unet_rows == [7] * 6
    for fields, result in zip(unary, results[:2]):
        alone = client.generate(**fields, **common)
        assert_same_image(result.images[0].data, alone.images[0].data)
    for fields, events in zip(streamed, results[2:]):
        assert kinds(events)[0] == "queued" and kinds(events)[1] == "started" and kinds(events)[-1] == "result"
        assert events[1].started.seed == fields["seed"]
        steps = [e.step for e in events if e.WhichOneof("event") == "step"]
        assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
        if fields["preview"] == "latent":
            assert all(s.latents.shape == [1, 4, 16, 16] for s in steps)
        else:
            assert all([p.seed for p in s.previews] == [fields["seed"]] for s in steps)
        alone = client.generate(**{k: v for k, v in fields.items() if k != "preview"}, **common)
        assert_same_image(events[-1].result.images[0].data, alone.images[0].data)


def test_full_queue_refuses_at_once_and_withdrawn_requests_never_run(bclient, batch_server, faulty):
    batcher = batch_server.server.batcher
    gate = Gate()
    faulty.before_unet = gate
    fields = dict(steps=2, scheduler="ddim", num_images=BATCH_IMAGES)
    running = bclient._stub.Generate.future(build_request("running", seed=1, **fields), timeout=WAIT_S)
    assert gate.entered.wait(WAIT_S)
    streams, events = [], []
    for i in range(MAX_QUEUE):  # one at a time, so positions are in order
        stream = bclient.stream(f"queued {i}", seed=10 + i, **fields)
        it = iter(stream)
        first = next(it)
        assert first.WhichOneof("event") == "queued" and first.queued.position == i + 1  # the running batch counts one
        streams.append(stream)
        events.append(it)
    assert batcher.queue_depth == MAX_QUEUE
    with pytest.raises(ClientError) as refused:
        bclient.generate("one too many", seed=5, **fields)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MAX_QUEUE} of {MAX_QUEUE}" in refused.value.details

    streams[0].cancel()  # leaves the queue now: the others move up
    moved = next(events[1])
    assert moved.WhichOneof("event") == "queued" and moved.queued.position == 1
    with pytest.raises(ClientError) as late:  # its deadline passes while it waits
        bclient.generate("too late", seed=6, timeout=0.5, **fields)
    assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED

    gate.open.set()
    assert running.result(WAIT_S).images
    for it in events[1:]:
        assert kinds(list(it))[-1] == "result"
    assert batcher.wait_idle(WAIT_S)
    # The running batch and three queued ones ran, two UNet calls each; the withdrawn two never did.
    assert faulty.unet_rows == [2 * BATCH_IMAGES] * 2 * 4


def test_cancel_while_running_leaves_the_batch_at_the_next_step(bclient, client, batch_server, faulty):
    batcher = batch_server.server.batcher
    fields = dict(steps=8, scheduler="ddim", num_images=2)
    reached = threading.Event()
    calls = []

    def hold_fourth_call(sample) -> None:
        calls.append(sample.shape[0])
        if len(calls) == 4:  # step 4 is in flight when the cancel lands
            reached.set()
            handle = next(h for h in batcher.running if h.request.request_id == "cancel-me")
            assert handle.wait_cancelled(WAIT_S)

    faulty.before_unet = hold_fourth_call
    cancelled = bclient.stream("a fox", seed=50, request_id="cancel-me", **fields)

    def cancel_at_step_4():
        assert reached.wait(WAIT_S)
        cancelled.cancel()

    def read_cancelled():
        try:
            list(cancelled)
        except ClientError as exc:
            return exc.code

    code, events, _ = in_parallel(
        read_cancelled, lambda: list(bclient.stream("a cat", seed=60, **fields)), cancel_at_step_4
    )
    assert code is grpc.StatusCode.CANCELLED
    assert [e.step.step for e in events if e.WhichOneof("event") == "step"] == list(range(1, 9))
    # 2 requests x 2 images x 2 guidance rows until the cancel lands, then the other request alone.
    assert faulty.unet_rows == [8, 8, 8, 8, 4, 4, 4, 4]
    alone = client.generate("a cat", seed=60, **fields)
    for a, b in zip(events[-1].result.images, alone.images):
        assert_same_image(a.data, b.data)


def test_out_of_memory_splits_the_unet_batch(bclient, client, batch_server, faulty):
    faulty.unet_oom = lambda sample: sample.shape[0] > 2
    fields = dict(steps=3, scheduler="ddim", num_images=2)
    first, second = in_parallel(
        lambda: bclient.generate("a red fox", seed=70, **fields),
        lambda: bclient.generate("a blue bird", seed=80, **fields),
    )
    assert faulty.ooms == 2  # 8 rows, then 4, ran out; 2 fit, and the run keeps that size
    assert faulty.unet_rows == [2] * 4 * 3
    for result, prompt, seed in ((first, "a red fox", 70), (second, "a blue bird", 80)):
        alone = client.generate(prompt, seed=seed, **fields)
        for a, b in zip(result.images, alone.images):
            assert_same_image(a.data, b.data)


def test_request_that_does_not_fit_fails_and_the_next_is_served(bclient, faulty):
    faulty.unet_oom = lambda sample: sample.shape[-1] > 16  # latents wider than 16: images wider than 64 px
    with pytest.raises(ClientError) as info:
        bclient.generate("too wide", seed=90, steps=2, width=128, num_images=BATCH_IMAGES)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "does not fit" in info.value.details
    assert bclient.generate("fits", seed=91, steps=2, num_images=BATCH_IMAGES).images


def test_out_of_memory_in_decode_decodes_image_by_image(bclient, client, faulty):
    faulty.decode_oom = lambda latents: latents.shape[0] > 1
    fields = dict(steps=2, scheduler="ddim", num_images=BATCH_IMAGES)
    result = bclient.generate("a house", seed=95, **fields)
    assert faulty.decode_rows == [1] * BATCH_IMAGES
    for a, b in zip(result.images, client.generate("a house", seed=95, **fields).images):
        assert_same_image(a.data, b.data)


def test_result_cache_answers_seeded_repeats(bclient, faulty):
    fields = dict(steps=2, scheduler="ddim", num_images=BATCH_IMAGES, seed=123)
    first = bclient.generate("cache me", request_id="c1", **fields)
    calls = len(faulty.unet_rows)
    assert not first.response.from_cache and calls == 2

    again = bclient.generate("cache me", request_id="c2", **fields)
    assert again.response.from_cache and again.response.request_id == "c2"
    assert [i.data for i in again.images] == [i.data for i in first.images]
    events = list(bclient.stream("cache me", request_id="c3", **fields))
    assert kinds(events) == ["started", "result"]  # nothing queued, nothing denoised
    assert events[0].started.total_steps == 2 and events[-1].result.from_cache
    assert [i.data for i in events[-1].result.images] == [i.data for i in first.images]
    assert len(faulty.unet_rows) == calls

    other_format = bclient.generate("cache me", output_format="jpeg", **fields)
    assert not other_format.response.from_cache  # a different request: a different key
    unseeded = [bclient.generate("cache me", steps=2, num_images=BATCH_IMAGES) for _ in range(2)]
    assert not any(r.response.from_cache for r in unseeded)


def scrape(batch_server) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{batch_server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_endpoint_counts_what_happened(bclient, batch_server, faulty):
    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    before = scrape(batch_server)
    fields = dict(steps=3, scheduler="ddim", num_images=BATCH_IMAGES, seed=321)
    bclient.generate("metrics", **fields)
    bclient.generate("metrics", **fields)  # a result-cache hit
    with pytest.raises(ClientError):
        bclient.generate("", **fields)
    after = scrape(batch_server)

    assert delta("diffusiond_requests_total", method="Generate", code="OK", client="-") == 2
    assert delta("diffusiond_requests_total", method="Generate", code="INVALID_ARGUMENT", client="-") == 1
    assert delta("diffusiond_request_duration_seconds_count", method="Generate") == 3
    assert delta("diffusiond_queue_wait_seconds_count", model="builtin") == 1
    assert delta("diffusiond_inference_seconds_count", model="builtin") == 1
    assert delta("diffusiond_batch_size_count", model="builtin") == 3  # observed at every denoising step
    assert delta("diffusiond_batch_images_sum", model="builtin") == 3 * BATCH_IMAGES
    assert delta("diffusiond_denoising_steps_total", model="builtin") == 3 * BATCH_IMAGES
    assert after[("diffusiond_denoising_steps_per_second", frozenset({("model", "builtin")}))] > 0
    assert delta("diffusiond_cache_hits_total", cache="result", model="builtin") == 1
    assert delta("diffusiond_cache_misses_total", cache="result", model="builtin") == 1
    # "metrics" and "" were looked up once each: new prompts miss, the negative prompt "" hits.
    assert delta("diffusiond_cache_misses_total", cache="prompt", model="builtin") == 1
    assert delta("diffusiond_cache_hits_total", cache="prompt", model="builtin") == 1
    assert after[("diffusiond_queue_depth", frozenset())] == 0
    assert after[("diffusiond_serving", frozenset())] == 1
    assert after[("diffusiond_result_cache_bytes", frozenset())] > 0


def test_every_exported_metric_is_documented(batch_server):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    names = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
             for name, _ in scrape(batch_server) if not name.endswith("_created")}
    undocumented = sorted(n for n in names if f"`{n}`" not in readme)
    assert not undocumented, f"README.md does not document {undocumented}"
