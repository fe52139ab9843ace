"""Hi-res fix: two passes in one request, counted as one, batched pass by pass, cancellable in either."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from fakes import scripted_model
from image_inputs import encode, picture
from PIL import Image

from diffusiond.client import ClientError
from diffusiond.errors import Cancelled
from diffusiond.eval.scorer import count_shapes
from diffusiond.eval.sharpness import edge_steepness
from diffusiond.pipeline import conditioning
from diffusiond.pipeline.observers import LastLatentsObserver, NullObserver
from diffusiond.pipeline.request import GenerationResult, PreviewKind, Upscaler
from diffusiond.service.batcher import Batcher, BatcherSettings, EventChannel, RequestHandle
from diffusiond.service.image_inputs import HiresParams
from diffusiond.service.resolver import GenerationParams, PreviewParams, resolve

WAIT_S = 60.0


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.total: int | None = None
        self.steps = []

    def on_started(self, info) -> None:
        self.total = info.total_steps

    def on_step(self, info) -> None:
        self.steps.append(info)


# -- the pipeline, on the built-in model ----------------------------------------------------------


def test_both_passes_are_one_request_with_one_step_count(model):
    request = resolve(GenerationParams(
        prompt="a red circle", steps=4, seed=3, scheduler="euler_a",
        hires=HiresParams(scale=2.0, strength=0.5), preview=PreviewParams(PreviewKind.FULL),
    ), model)
    observer = Recorder()
    result = model.pipeline.generate(request, observer)
    assert observer.total == 6 == model.pipeline.planned_steps(request)  # 4, then int(4 * 0.5)
    assert [(s.step, s.total_steps) for s in observer.steps] == [(i, 6) for i in range(1, 7)]
    assert [(s.width, s.height) for s in observer.steps] == [(64, 64)] * 4 + [(128, 128)] * 2
    assert [s.preview.shape for s in observer.steps] == [(1, 64, 64, 3)] * 4 + [(1, 128, 128, 3)] * 2
    assert result.images.shape == (1, 128, 128, 3)


@pytest.mark.parametrize("upscaler", [Upscaler.LATENT_BICUBIC, Upscaler.LANCZOS])
def test_hires_strength_zero_is_the_upscaled_first_pass(model, upscaler):
    plain = resolve(GenerationParams(prompt="a blue square", steps=3, seed=8,
                                     preview=PreviewParams(PreviewKind.LATENT, every_n_steps=3)), model)
    first = LastLatentsObserver()
    small = model.pipeline.generate(plain, first)
    hires = resolve(GenerationParams(prompt="a blue square", steps=3, seed=8,
                                     hires=HiresParams(scale=2.0, strength=0.0, upscaler=upscaler)), model)
    result = model.pipeline.generate(hires)
    backend, scaling = model.pipeline.backend, model.config.scaling_factor
    if upscaler is Upscaler.LATENT_BICUBIC:
        side = 128 // model.config.vae_scale_factor
        latents = conditioning.upscale_latents(torch.from_numpy(first.latents), side, side)
    else:
        larger = conditioning.resize_images(small.images_uint8(), 128, 128)
        latents = backend.vae_encode(conditioning.pixels_to_tensor(larger[0])) * scaling
    expected = (backend.vae_decode(latents / scaling) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(result.images - expected).max() <= 1e-4


def test_hires_after_img2img(model):
    request = resolve(GenerationParams(prompt="a red circle", steps=4, seed=1, init_image=encode(picture(64, 64)),
                                       strength=0.5, hires=HiresParams(width=96, height=128, steps=2)), model)
    observer = Recorder()
    result = model.pipeline.generate(request, observer)
    assert observer.total == 2 + 1 and result.images.shape == (1, 128, 96, 3)


def test_on_the_built_in_model_hires_fix_redraws_edges_and_keeps_one_shape(model):
    """64 -> 128 with Lanczos 2x and a 0.25 second pass: steeper edges than the 64-pixel image enlarged,
    and the one shape asked for. (Directly at 128, a size it never saw, the built-in model draws 2.4 shapes
    on average: see BENCHMARKS.md, Hi-res fix.)"""
    for seed, prompt in enumerate(["a large black triangle on a green background, top",
                                   "a large white triangle on a yellow background, top right"]):
        fields = dict(prompt=prompt, steps=20, seed=seed)
        small = model.pipeline.generate(resolve(GenerationParams(**fields), model)).images_uint8()[0]
        enlarged = conditioning.resize_images(small[None], 128, 128)[0]
        hires = model.pipeline.generate(resolve(GenerationParams(
            **fields, hires=HiresParams(scale=2.0, strength=0.25, upscaler=Upscaler.LANCZOS)), model)).images_uint8()[0]
        assert edge_steepness(hires) > 1.2 * edge_steepness(enlarged)
        assert count_shapes(small) == count_shapes(hires) == 1


# -- the batcher, on the scripted backend ----------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def handle_for(model, loop, rid: str, **fields) -> RequestHandle:
    fields.setdefault("guidance_scale", 1.0)  # one UNet row per image: the row counts read plainly
    request = resolve(GenerationParams(prompt=f"prompt {rid}", request_id=rid, seed=1, **fields), model)
    return RequestHandle(request, model, loop, None, EventChannel(64))


def calls(model) -> list[tuple[int, int]]:
    return [(call.rows, call.size[0]) for call in model.backend.calls]


def scenario(cancel_at: int | None = None):
    """H (hires 64 -> 128: 4 + 2 steps) and P64 (6 steps) start together; P128 (3 steps) queues behind them."""

    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=4))
        hires = handle_for(model, loop, "hires", steps=4, hires=HiresParams(scale=2.0, steps=4, strength=0.5))
        plain64 = handle_for(model, loop, "plain64", steps=6)
        plain128 = handle_for(model, loop, "plain128", steps=3, width=128, height=128)
        if cancel_at is not None:
            model.backend.before_unet = lambda number: batcher.cancel(hires) if number == cancel_at else None
        for handle in (hires, plain64, plain128):
            batcher.submit(handle)
        batcher.start()
        outcomes = await asyncio.gather(hires.outcome, plain64.outcome, plain128.outcome, return_exceptions=True)
        await asyncio.sleep(0)
        steps = [(e.step, e.total_steps, e.width) for e in hires.events._items if hasattr(e, "step")]
        batcher.shutdown()
        return model, outcomes, steps

    return run(main())


def test_the_second_pass_leaves_the_running_set_and_resumes_with_its_size():
    model, (hires, plain64, plain128), steps = scenario()
    # Steps 1-4: H's first pass with P64 (latents 8x8). H then moves out; P128 may not overtake it, so
    # P64 finishes alone; then H's second pass and P128 share calls at 16x16.
    assert calls(model) == [(2, 8)] * 4 + [(1, 8)] * 2 + [(2, 16)] * 2 + [(1, 16)]
    assert steps == [(i, 6, 64) for i in range(1, 5)] + [(5, 6, 128), (6, 6, 128)]
    for outcome in (hires, plain64, plain128):
        assert isinstance(outcome, GenerationResult)
        solo = scripted_model().pipeline.generate(outcome.request)
        np.testing.assert_array_equal(outcome.images, solo.images)
    assert hires.images.shape == (1, 128, 128, 3)


def test_a_request_cancelled_while_it_waits_to_resume_leaves_at_once():
    model, (hires, plain64, plain128), steps = scenario(cancel_at=5)
    assert isinstance(hires, Cancelled) and len(steps) == 4
    assert isinstance(plain64, GenerationResult) and isinstance(plain128, GenerationResult)
    assert calls(model) == [(2, 8)] * 4 + [(1, 8)] * 2 + [(1, 16)] * 3


def test_a_request_cancelled_in_its_second_pass_stops_before_the_next_step():
    model, (hires, plain64, plain128), steps = scenario(cancel_at=7)  # while its first 128 step runs
    assert isinstance(hires, Cancelled) and [s[0] for s in steps] == [1, 2, 3, 4, 5]
    assert isinstance(plain128, GenerationResult)
    assert calls(model) == [(2, 8)] * 4 + [(1, 8)] * 2 + [(2, 16)] + [(1, 16)] * 2


def test_a_request_whose_first_pass_has_no_steps_starts_at_its_second_size():
    """img2img at strength 0 plus hi-res: admitted by its first size, it is at the second after prepare."""

    async def main():
        model = scripted_model()
        loop = asyncio.get_running_loop()
        batcher = Batcher(BatcherSettings(max_batch_size=4))
        plain = handle_for(model, loop, "plain", steps=3)
        jump = handle_for(model, loop, "jump", steps=3, init_image=encode(picture()), strength=0.0,
                          hires=HiresParams(scale=2.0, steps=4, strength=0.5))
        for handle in (plain, jump):
            batcher.submit(handle)
        batcher.start()
        outcomes = await asyncio.gather(plain.outcome, jump.outcome, return_exceptions=True)
        batcher.shutdown()
        return model, outcomes

    model, (plain, jump) = run(main())
    assert isinstance(plain, GenerationResult) and isinstance(jump, GenerationResult)
    assert calls(model) == [(1, 8)] * 3 + [(1, 16)] * 2
    np.testing.assert_array_equal(jump.images, scripted_model().pipeline.generate(jump.request).images)


# -- over gRPC ------------------------------------------------------------------------------------


def test_streamed_hires_request_counts_both_passes(client):
    events = list(client.stream("a red circle", seed=4, steps=4, hires="2x", hires_strength=0.5, hires_steps=4))
    kinds = [e.WhichOneof("event") for e in events]
    started = events[kinds.index("started")].started
    assert (started.total_steps, started.width, started.height) == (6, 128, 128)
    assert [e.step.step for e in events if e.HasField("step")] == [1, 2, 3, 4, 5, 6]
    result = events[-1].result
    image = Image.open(io.BytesIO(result.images[0].data))
    assert image.size == (128, 128) == (result.images[0].width, result.images[0].height)
    assert "Hires resize: 128x128, Hires steps: 4, Hires denoising strength: 0.5" in image.text["parameters"]


def test_hires_with_a_mask_or_too_large_is_refused(client):
    with pytest.raises(ClientError) as info:
        client.generate("x", steps=2, init_image=encode(picture()), mask=encode(np.zeros((64, 64), np.uint8)), hires=2)
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.INVALID_ARGUMENT, "hires: cannot be combined with mask_image; inpaint at the size you want instead"
    )
    with pytest.raises(ClientError) as info:
        client.generate("x", steps=2, hires="64x32")
    assert info.value.details == "hires.height: must be a multiple of 4 between the first pass's 64 and 2048, got 32"
