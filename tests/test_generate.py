"""Generate over a real gRPC server: determinism, seeds, formats."""

from __future__ import annotations

import io

import numpy as np
from images import assert_same_image, pixels
from PIL import Image

from diffusiond.client import build_request

# Image i of a request and the same image made alone (seed + i, num_images=1) share
# all their noise, but run in UNet batches of different sizes: see images.py.


def test_same_seed_same_png_bytes(client):
    a = client.generate("a red fox in the snow", seed=11, steps=4)
    b = client.generate("a red fox in the snow", seed=11, steps=4)
    assert a.images[0].data == b.images[0].data
    assert a.images[0].data.startswith(b"\x89PNG")
    assert a.seed == 11 and a.images[0].seed == 11


def test_stream_result_equals_generate(client):
    fields = dict(seed=5, steps=4, num_images=2, negative_prompt="dark", scheduler="euler_a")
    unary = client.generate("a green tree", **fields)
    events = list(client.stream("a green tree", **fields))
    streamed = events[-1].result
    assert [i.data for i in streamed.images] == [i.data for i in unary.images]


def test_num_images_are_distinct_and_each_reproducible_alone(client):
    batch = client.generate("a cat", seed=100, steps=4, num_images=3, scheduler="euler_a")
    assert [i.seed for i in batch.images] == [100, 101, 102]
    arrays = [pixels(i.data).astype(float) for i in batch.images]
    assert np.abs(arrays[0] - arrays[1]).mean() > 20 and np.abs(arrays[1] - arrays[2]).mean() > 20
    alone = client.generate("a cat", seed=101, steps=4, num_images=1, scheduler="euler_a")
    assert_same_image(alone.images[0].data, batch.images[1].data)


def test_seed_wraps_modulo_2_64(client):
    last = 2**64 - 1
    result = client.generate("a dog", seed=last, steps=2, num_images=2)
    assert [i.seed for i in result.images] == [last, 0]
    again = client.generate("a dog", seed=0, steps=2)
    assert_same_image(again.images[0].data, result.images[1].data)


def test_missing_seed_is_drawn_and_returned(client):
    first = client.generate("a bird", steps=3)
    second = client.generate("a bird", steps=3)
    assert first.seed != second.seed  # 32-bit draws: equal only by a 1-in-4-billion chance
    replay = client.generate("a bird", steps=3, seed=first.seed)
    assert replay.images[0].data == first.images[0].data


def test_defaults_and_response_fields(client, model):
    result = client.generate("a house", seed=1, steps=2, request_id="my-request-1")
    r = result.response
    assert r.request_id == "my-request-1"
    assert (r.model, r.backend, r.scheduler, r.steps) == ("builtin", "torch", model.schedulers.default_name, 2)
    assert abs(r.guidance_scale - model.limits.default_guidance_scale) < 1e-6  # the model's own default
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    assert pixels(result.images[0].data).shape == (64, 64, 3)
    assert r.timings.denoise_s > 0 and r.timings.total_s >= r.timings.denoise_s
    assert "Seed: 1" in Image.open(io.BytesIO(result.images[0].data)).info["parameters"]


def test_output_formats_and_size(client):
    for fmt, magic, mime in (("jpeg", b"\xff\xd8", "image/jpeg"), ("webp", b"RIFF", "image/webp")):
        result = client.generate("a sun", seed=2, steps=2, width=96, height=64, output_format=fmt, quality=70)
        image = result.images[0]
        assert image.data.startswith(magic) and image.mime_type == mime
        assert Image.open(io.BytesIO(image.data)).size == (96, 64)


def test_long_prompt_is_truncated_with_a_warning(client):
    result = client.generate(" ".join(["red"] * 100), seed=3, steps=2)
    assert any("prompt was truncated" in w for w in result.response.warnings)


def test_request_id_generated_when_empty(client):
    response = client.generate_request(build_request("a moon", steps=1, seed=1)).response
    assert len(response.request_id) == 32
