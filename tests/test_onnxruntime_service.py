"""A server on the ONNX Runtime backend behaves as the eager one: same requests, same events, same errors.

Each test sends the same request to the eager server (conftest's ``server``)
and to one serving the built-in model's fp32 ONNX export under the same name.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import CountingBackend, running_server
from image_inputs import box_mask, encode, picture
from images import pixels

from diffusiond.backends.base import BackendSettings
from diffusiond.client import ClientError, DiffusionClient, build_request, tensor_to_numpy
from diffusiond.eval.compare import psnr as image_psnr
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread

MIN_PSNR_DB = 45.0  # fp32 ONNX Runtime vs fp32 PyTorch, 8-bit images
WAIT_S = 30.0


@pytest.fixture(scope="module")
def ort_server(onnx_export) -> Iterator[ServerThread]:
    settings = ServerSettings(
        host="127.0.0.1", port=0, models=[ModelSource("builtin", str(onnx_export("fp32")))],
        backend="onnxruntime", backend_settings=BackendSettings(threads=2),
    )
    with running_server(settings, CountingBackend) as thread:
        yield thread


@pytest.fixture(scope="module")
def ort_client(ort_server) -> Iterator[DiffusionClient]:
    with DiffusionClient(ort_server.address, timeout=120) as c:
        yield c


def psnr(a: bytes, b: bytes) -> float:
    return image_psnr(pixels(a), pixels(b))


def test_generate_matches_eager(client, ort_client):
    fields = dict(seed=5, steps=5, num_images=2, negative_prompt="dark", scheduler="euler_a", width=64, height=80)
    eager = client.generate("a green tree", **fields)
    ours = ort_client.generate("a green tree", **fields)
    assert ours.response.backend == "onnxruntime" and eager.response.backend == "torch"
    assert [i.seed for i in ours.images] == [i.seed for i in eager.images] == [5, 6]
    for a, b in zip(ours.images, eager.images):
        assert (a.width, a.height) == (b.width, b.height) == (64, 80)
        assert psnr(a.data, b.data) >= MIN_PSNR_DB


def test_same_seed_same_bytes_and_stream_equals_generate(ort_client):
    unary = ort_client.generate("a cat", seed=3, steps=4)
    again = ort_client.generate("a cat", seed=3, steps=4)
    events = list(ort_client.stream("a cat", seed=3, steps=4))
    assert unary.images[0].data == again.images[0].data == events[-1].result.images[0].data


def kinds(events):
    return [e.WhichOneof("event") for e in events]


@pytest.mark.parametrize("preview", ["none", "latent", "approx_rgb", "full"])
def test_stream_events_match_eager(client, ort_client, preview):
    fields = dict(seed=9, steps=4, scheduler="dpmpp_2m", num_images=2, preview=preview, preview_every=2)
    if preview == "none":
        fields.pop("preview"), fields.pop("preview_every")
    eager = list(client.stream("a red fox", **fields))
    ours = list(ort_client.stream("a red fox", **fields))
    assert kinds(ours) == kinds(eager)
    assert ours[1].started.backend == "onnxruntime" and ours[1].started.total_steps == eager[1].started.total_steps
    steps = [(e.step, o.step) for e, o in zip(eager, ours) if e.WhichOneof("event") == "step"]
    assert len(steps) == 4
    for e, o in steps:
        assert (o.step, o.total_steps, o.timestep) == (e.step, e.total_steps, e.timestep)
        assert [(p.index, p.width, p.height, p.mime_type) for p in o.previews] == [
            (p.index, p.width, p.height, p.mime_type) for p in e.previews
        ]
        assert o.HasField("latents") == e.HasField("latents")
        if o.HasField("latents"):
            mine, theirs = tensor_to_numpy(o.latents), tensor_to_numpy(e.latents)
            assert mine.shape == theirs.shape == (2, 4, 16, 16)
            assert np.abs(mine - theirs).max() <= 1e-4 * np.abs(theirs).max() + 1e-4
        for p, q in zip(o.previews, e.previews):
            assert np.abs(pixels(p.data).astype(float) - pixels(q.data)).mean() < 2.0  # JPEG of nearly equal pixels
    for a, b in zip(ours[-1].result.images, eager[-1].result.images):
        assert psnr(a.data, b.data) >= MIN_PSNR_DB


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (dict(width=65), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(num_images=9), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(guidance_scale=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(scheduler="warp_drive"), grpc.StatusCode.NOT_FOUND),
        (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_errors_match_eager(client, ort_client, fields, code):
    errors = []
    for c in (client, ort_client):
        with pytest.raises(ClientError) as info:
            c.generate_request(build_request("a fox", steps=2, **fields))
        errors.append(info.value)
    assert errors[0].code is errors[1].code is code
    assert errors[0].details == errors[1].details


def test_cancelled_stream_stops_within_one_step(ort_client, ort_server):
    counting = ort_server.server.registry.get("builtin").pipeline.backend
    start = counting.unet_calls
    reached = threading.Event()

    def hook(call: int) -> None:  # hold the 4th call until the server has seen the cancel
        if call == start + 4:
            reached.set()
            running = ort_server.server.batcher.running
            assert running and running[0].wait_cancelled(WAIT_S)

    counting.before_unet = hook
    try:
        stream = ort_client.stream("a fox", seed=1, steps=50, scheduler="ddim")
        with pytest.raises(ClientError) as info:
            for event in stream:
                if event.WhichOneof("event") == "step" and event.step.step == 3:
                    stream.cancel()
        assert info.value.code is grpc.StatusCode.CANCELLED
        assert ort_server.server.batcher.wait_idle(WAIT_S)
        # Steps 1-3 ran; step 4's call may have started before the cancel landed, nothing after it.
        assert counting.unet_calls - start in (3, 4)
    finally:
        counting.before_unet = None
    assert ort_client.generate("a fox", seed=1, steps=2).images


def test_deadline_stops_the_work(ort_client, ort_server):
    counting = ort_server.server.registry.get("builtin").pipeline.backend
    start = counting.unet_calls
    with pytest.raises(ClientError) as info:
        ort_client.generate("a fox", seed=3, steps=200, timeout=0.3)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert ort_server.server.batcher.wait_idle(WAIT_S)
    assert counting.unet_calls - start < 200


def test_list_models_reports_the_backend_precision(ort_client):
    (model,) = ort_client.list_models()
    assert model.name == "builtin" and model.backend == "onnxruntime" and model.dtype == "fp32"
    assert model.image_inputs.img2img and model.image_inputs.inpainting_method == "latent_blend"


@pytest.mark.parametrize("fields", [
    dict(strength=0.6),
    dict(mask=True, keep_unmasked=True, mask_blur=2),
    dict(strength=0.5, hires=2, hires_upscaler="lanczos", hires_strength=0.3, hires_steps=4),
], ids=["img2img", "inpainting", "img2img+hires-lanczos"])
def test_image_inputs_match_eager(client, ort_client, fields):
    """The export's VAE encoder serves img2img, inpainting and the pixel upscaler as the eager one does."""
    if fields.pop("mask", False):
        fields["mask"] = encode(box_mask())
    fields = dict(init_image=encode(picture()), seed=2, steps=6, scheduler="euler_a", **fields)
    eager = client.generate("a red circle", **fields)
    ours = ort_client.generate("a red circle", **fields)
    assert (ours.images[0].width, ours.images[0].height) == (eager.images[0].width, eager.images[0].height)
    assert psnr(ours.images[0].data, eager.images[0].data) >= MIN_PSNR_DB
