"""img2img and inpainting reproduce diffusers' pipelines, and image-conditioned rows batch with plain ones.

Init latents are the VAE encoder's mean (diffusers' ``sample_mode="argmax"``;
every backend's encoder returns the mean), so the diffusers side is asked for
the same by patching its ``retrieve_latents``; everything else (timesteps from
strength, noise, ``add_noise``, blending, the 9-channel UNet input) is
diffusers' own code on the same model, seed and scheduler.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from fakes import scripted_model
from image_inputs import box_mask, encode, picture
from PIL import Image, ImageFilter

from diffusiond.pipeline.observers import NullObserver
from diffusiond.pipeline.schedulers import SCHEDULERS
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve

TOLERANCE = 1e-4  # the text-to-image parity test's: float images in [0, 1]
# Schedulers that add fresh noise each step (Euler ancestral, DDPM): on the built-in model's zero-terminal-SNR
# schedule their first sigma is about 4,000, and float32 rounding of the scaled input grows with it (measured:
# 1.8e-4 and 1.4e-4 at strength 0.75).
STOCHASTIC_TOLERANCE = 3e-4
BATCH_TOLERANCE = 6 / 255  # alone vs batched on the CPU: kernel rounding (see images.py)
PROMPT = "a red circle on a blue background"
PICTURE = picture(64, 64)
MASK = box_mask(64, 64, (16, 8, 56, 40))


def argmax_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


@pytest.fixture(scope="module", autouse=True)
def diffusers_takes_the_mean() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(img2img_module, "retrieve_latents", argmax_latents)
        patch.setattr(inpaint_module, "retrieve_latents", argmax_latents)
        yield


def reference(cls, model_dir):
    pipe = cls.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def with_scheduler(reference_pipe, name: str):
    pipe, config = reference_pipe
    spec = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(config, **spec.overrides)
    return pipe


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def params(**fields) -> GenerationParams:
    fields.setdefault("steps", 10)
    fields.setdefault("seed", 5)
    return GenerationParams(prompt=PROMPT, guidance_scale=4.0, **fields)


@pytest.fixture(scope="module")
def img2img_reference(builtin_dir):
    return reference(StableDiffusionImg2ImgPipeline, builtin_dir)


@pytest.fixture(scope="module")
def inpaint_reference(builtin_dir):
    return reference(StableDiffusionInpaintPipeline, builtin_dir)


# -- img2img --------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "strength"), [
    ("ddim", 0.3), ("euler_a", 0.75), ("dpmpp_2m_karras", 0.5), ("euler", 0.6), ("ddpm", 0.75), ("unipc", 0.3),
])
def test_img2img_matches_diffusers(model, img2img_reference, scheduler, strength):
    request = resolve(params(scheduler=scheduler, num_images=2, init_image=encode(PICTURE), strength=strength), model)
    ours = model.pipeline.generate(request).images
    expected = with_scheduler(img2img_reference, scheduler)(
        PROMPT, image=Image.fromarray(PICTURE), strength=strength, num_inference_steps=10, guidance_scale=4.0,
        num_images_per_prompt=2, generator=generators(5, 2), output_type="np",
    ).images
    assert ours.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(ours - expected).max() <= (STOCHASTIC_TOLERANCE if scheduler in ("euler_a", "ddpm") else TOLERANCE)


def test_strength_one_is_text_to_image(model):
    text = model.pipeline.generate(resolve(params(scheduler="euler_a"), model)).images
    image = model.pipeline.generate(resolve(params(scheduler="euler_a", init_image=encode(PICTURE), strength=1.0), model))
    np.testing.assert_array_equal(image.images, text)


def test_strength_zero_is_the_vae_round_trip_of_the_input(model):
    result = model.pipeline.generate(resolve(params(init_image=encode(PICTURE), strength=0.0), model))
    backend = model.pipeline.backend
    x = torch.from_numpy(PICTURE).float().permute(2, 0, 1)[None] / 255 * 2 - 1
    round_trip = ((backend.vae_decode(backend.vae_encode(x)) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert np.abs(result.images - round_trip).max() <= 1e-5
    assert np.abs(result.images_uint8().astype(int) - PICTURE).mean() < 20  # it is the picture, through the VAE


class Steps(NullObserver):
    def __init__(self) -> None:
        self.total: int | None = None
        self.steps: list[tuple[int, int]] = []

    def on_started(self, info) -> None:
        self.total = info.total_steps

    def on_step(self, info) -> None:
        self.steps.append((info.step, info.total_steps))


@pytest.mark.parametrize(("scheduler", "steps", "strength", "expected"), [
    ("ddim", 10, 0.35, 3), ("euler", 20, 0.6, 12), ("unipc", 10, 0.5, 5), ("dpmpp_2m", 10, 0.0, 0),
])
def test_progress_says_how_many_steps_run(model, scheduler, steps, strength, expected):
    """int(steps * strength) steps run, as in diffusers."""
    request = resolve(params(scheduler=scheduler, steps=steps, init_image=encode(PICTURE), strength=strength), model)
    observer = Steps()
    model.pipeline.generate(request, observer)
    assert observer.total == expected == model.pipeline.planned_steps(request)
    assert observer.steps == [(i, expected) for i in range(1, expected + 1)]


# -- inpainting, 4-channel UNet ----------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 1.0), ("euler_a", 0.6), ("dpmpp_2m_karras", 0.8)])
def test_inpainting_by_latent_blending_matches_diffusers(model, inpaint_reference, scheduler, strength):
    request = resolve(params(scheduler=scheduler, num_images=2, init_image=encode(PICTURE), mask_image=encode(MASK),
                             strength=strength), model)
    ours = model.pipeline.generate(request).images
    expected = with_scheduler(inpaint_reference, scheduler)(
        PROMPT, image=Image.fromarray(PICTURE), mask_image=Image.fromarray(MASK), strength=strength, height=64,
        width=64, num_inference_steps=10, guidance_scale=4.0, num_images_per_prompt=2, generator=generators(5, 2),
        output_type="np",
    ).images
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_keep_unmasked_returns_the_unmasked_pixels_exactly(model):
    fields = dict(init_image=encode(PICTURE), mask_image=encode(MASK), mask_blur=2)
    kept = model.pipeline.generate(resolve(params(keep_unmasked=True, **fields), model)).images_uint8()[0]
    loose = model.pipeline.generate(resolve(params(**fields), model)).images_uint8()[0]
    blurred = np.asarray(Image.fromarray(MASK).filter(ImageFilter.GaussianBlur(2)))
    outside, inside = blurred == 0, blurred == 255
    assert outside.sum() > 2000 and inside.sum() > 600
    np.testing.assert_array_equal(kept[outside], PICTURE[outside])  # 0 levels: exact
    assert np.abs(loose[outside].astype(int) - PICTURE[outside]).max() > 0  # without it: through the VAE
    np.testing.assert_array_equal(kept[inside], loose[inside])  # the repainted area is the model's
    assert np.abs(kept[inside].astype(int) - PICTURE[inside]).mean() > 10


# -- inpainting, 9-channel UNet ----------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_model_dir(builtin_dir, tmp_path_factory):
    """The built-in model with a seeded random 9-channel inpainting UNet of a small config."""
    directory = tmp_path_factory.mktemp("inpainting") / "model"
    shutil.copytree(builtin_dir, directory)
    shutil.rmtree(directory / "unet")
    config = {k: v for k, v in json.loads((builtin_dir / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    config.update(in_channels=9, block_out_channels=[32] * len(config["block_out_channels"]))
    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(directory / "unet")
    return directory


@pytest.fixture(scope="module")
def inpainting_model(inpainting_model_dir):
    model = load_model("inpainting", inpainting_model_dir)
    yield model
    model.backend.close()


@pytest.fixture(scope="module")
def inpainting_reference(inpainting_model_dir):
    return reference(StableDiffusionInpaintPipeline, inpainting_model_dir)


@pytest.mark.parametrize(("scheduler", "strength"), [("dpmpp_2m", 1.0), ("euler_a", 0.6)])
def test_inpainting_unet_matches_diffusers(inpainting_model, inpainting_reference, scheduler, strength):
    model = inpainting_model
    assert model.config.inpainting_unet and model.image_support.inpainting_method == "unet"
    request = resolve(params(scheduler=scheduler, steps=6, num_images=2, init_image=encode(PICTURE),
                             mask_image=encode(MASK), strength=strength), model)
    ours = model.pipeline.generate(request).images
    expected = with_scheduler(inpainting_reference, scheduler)(
        PROMPT, image=Image.fromarray(PICTURE), mask_image=Image.fromarray(MASK), strength=strength, height=64,
        width=64, num_inference_steps=6, guidance_scale=4.0, num_images_per_prompt=2, generator=generators(5, 2),
        output_type="np",
    ).images
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_plain_rows_on_an_inpainting_unet_get_diffusers_all_white_mask(inpainting_model, inpainting_reference):
    """Text to image (and img2img) on a 9-channel UNet: mask 1 everywhere, latents of an all-zero image."""
    model = inpainting_model
    ours = model.pipeline.generate(resolve(params(scheduler="dpmpp_2m", steps=6), model)).images
    expected = with_scheduler(inpainting_reference, "dpmpp_2m")(
        PROMPT, image=Image.fromarray(PICTURE), mask_image=Image.fromarray(np.full((64, 64), 255, np.uint8)),
        strength=1.0, height=64, width=64, num_inference_steps=6, guidance_scale=4.0, generator=generators(5, 1),
        output_type="np",
    ).images
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_plain_and_masked_rows_share_the_inpainting_unets_calls(inpainting_model):
    model = inpainting_model
    requests = [
        resolve(params(steps=4, seed=1, request_id="plain"), model),
        resolve(params(steps=4, seed=2, request_id="masked", init_image=encode(PICTURE), mask_image=encode(MASK)), model),
        resolve(params(steps=4, seed=3, request_id="img2img", init_image=encode(PICTURE), strength=1.0), model),
    ]
    calls = []
    unet = model.pipeline.backend.unet
    model.pipeline.backend.unet = lambda sample, *rest: calls.append(tuple(sample.shape)) or unet(sample, *rest)
    try:
        together = model.pipeline.generate_together(requests)
    finally:
        del model.pipeline.backend.unet
    side = model.config.unet_sample_size
    assert calls == [(6, 9, side, side)] * 4  # three guided requests: six rows of 9 channels, one call per step
    for request, result in zip(requests, together):
        alone = model.pipeline.generate(request).images
        assert np.abs(result.images - alone).max() <= BATCH_TOLERANCE


# -- batching with plain requests -----------------------------------------------------------------


def test_image_conditioned_requests_batch_with_plain_ones_and_keep_their_images():
    """On the scripted backend (row-wise exact networks): one UNet call per step, images bit-identical to solo."""
    model = scripted_model()
    requests = [
        resolve(GenerationParams(prompt="plain", steps=6, seed=1), model),
        resolve(GenerationParams(prompt="from a picture", steps=6, seed=2, init_image=encode(PICTURE), strength=0.5,
                                 scheduler="euler_a"), model),
        resolve(GenerationParams(prompt="a masked one", steps=6, seed=3, init_image=encode(PICTURE),
                                 mask_image=encode(MASK), guidance_scale=1.0), model),
    ]
    together = model.pipeline.generate_together(requests)
    rows = [call.rows for call in model.backend.calls]
    # Guided plain (2 rows), guided img2img (2 rows, 3 of 6 steps), unguided inpainting (1 row).
    assert rows == [5, 5, 5, 3, 3, 3]
    for request, result in zip(requests, together):
        solo = scripted_model().pipeline.generate(request)
        np.testing.assert_array_equal(result.images, solo.images)
