"""StreamProgress: event order, step fields, and each preview kind."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from diffusiond.client import tensor_to_numpy


def kinds(events):
    return [e.WhichOneof("event") for e in events]


def test_event_sequence(client):
    events = list(client.stream("a red fox", seed=9, steps=6, scheduler="ddim", request_id="s1"))
    k = kinds(events)
    assert k[0] == "queued" and k[1] == "started" and k[-1] == "result"
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s.total_steps == 6 for s in steps)
    assert all(e.request_id == "s1" for e in events)
    started = events[1].started
    assert (started.model, started.backend, started.total_steps, started.seed) == ("builtin", "torch", 6, 9)
    timesteps = [s.timestep for s in steps]
    assert timesteps == sorted(timesteps, reverse=True)
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(steps, steps[1:]))
    assert steps[-1].eta_s == 0.0 and steps[0].eta_s > 0


def test_latent_preview_of_last_step_decodes_to_the_result(client, model):
    events = list(client.stream("a blue circle", seed=21, steps=5, scheduler="dpmpp_2m", preview="latent"))
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert all(s.HasField("latents") for s in steps)
    latents = tensor_to_numpy(steps[-1].latents)
    assert latents.shape == (1, 4, 16, 16) and latents.dtype == np.float32
    decoded = model.backend.vae_decode(torch.from_numpy(latents.copy()) / model.config.scaling_factor)
    image = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)[0]
    final = np.asarray(Image.open(io.BytesIO(events[-1].result.images[0].data)).convert("RGB"))
    # Same VAE, same float32 latents: the same pixels (one level allowed for kernel rounding).
    assert np.abs(image.astype(int) - final.astype(int)).max() <= 1


def test_approx_rgb_previews_every_n_steps(client):
    events = list(
        client.stream("a tree", seed=4, steps=7, scheduler="ddim", num_images=2, preview="approx_rgb", preview_every=3, preview_max_size=32)
    )
    with_previews = [e.step for e in events if e.WhichOneof("event") == "step" and e.step.previews]
    assert [s.step for s in with_previews] == [3, 6, 7]  # every 3rd, and always the last
    for step in with_previews:
        assert [p.index for p in step.previews] == [0, 1]
        for p in step.previews:
            assert p.mime_type == "image/jpeg"
            assert Image.open(io.BytesIO(p.data)).size == (32, 32) == (p.width, p.height)


def test_full_preview_is_a_vae_decode_at_image_size(client):
    events = list(client.stream("a house", seed=4, steps=3, width=96, height=64, preview="full"))
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert all(len(s.previews) == 1 for s in steps)
    image = Image.open(io.BytesIO(steps[-1].previews[0].data))
    assert image.size == (96, 64)
    final = np.asarray(Image.open(io.BytesIO(events[-1].result.images[0].data)).convert("RGB"), dtype=float)
    first = np.asarray(Image.open(io.BytesIO(steps[0].previews[0].data)).convert("RGB"), dtype=float)
    last = np.asarray(image.convert("RGB"), dtype=float)
    # The prediction converges on the result as denoising proceeds.
    assert np.abs(last - final).mean() < np.abs(first - final).mean()
