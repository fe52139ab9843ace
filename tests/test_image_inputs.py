"""The rules a request's image inputs are resolved by: sizes, fitting, defaults, and what needs what."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fakes import scripted_model
from image_inputs import box_mask, encode, picture

from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.pipeline.request import Upscaler
from diffusiond.service.image_inputs import HiresParams, fit
from diffusiond.service.outputs import EncodedResult
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.service.result_cache import CachedResult, result_key

MODEL = scripted_model()  # 64 native, sizes 64..256 in multiples of 8


def resolved(**fields):
    return resolve(GenerationParams(prompt="a fox", seed=1, **fields), MODEL)


def refused(**fields) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        resolved(**fields)
    return info.value


def test_without_a_size_the_output_takes_the_init_images_size():
    assert resolved(init_image=encode(picture(96, 72))).width == 96
    request = resolved(init_image=encode(picture(100, 70)))  # rounded down to multiples of 8
    assert (request.width, request.height) == (96, 64)
    request = resolved(init_image=encode(picture(1000, 500)))  # scaled into 64..256, aspect kept
    assert (request.width, request.height) == (256, 128)
    request = resolved(init_image=encode(picture(40, 30)))  # scaled up to the least size
    assert (request.width, request.height) == (80, 64)
    request = resolved(init_image=encode(picture(96, 72)), width=64)  # one side given: the other is the default
    assert (request.width, request.height) == (64, 64)


def test_an_image_of_another_aspect_is_scaled_to_cover_and_centre_cropped():
    source = np.zeros((40, 120, 3), dtype=np.uint8)
    source[:, :40] = (255, 0, 0)  # red, white and blue thirds: a square crop keeps the white one
    source[:, 40:80] = 255
    source[:, 80:] = (0, 0, 255)
    request = resolved(init_image=encode(source), width=64, height=64)
    pixels = request.init.pixels.astype(int)
    assert pixels.shape == (64, 64, 3)
    assert pixels[:, 4:60].min() > 230  # the middle, scaled 1.6x to cover 64 pixels
    assert np.abs(pixels[:, :, 0] - pixels[:, :, 2]).max() < 40  # neither red nor blue made it in


def test_extreme_aspect_ratios_crop_in_the_source_without_a_huge_intermediate():
    from PIL import Image

    thin = Image.new("RGB", (20000, 2), (10, 200, 30))
    out = fit(thin, 64, 64)
    assert out.size == (64, 64) and out.getpixel((5, 5)) == (10, 200, 30)


def test_strength_defaults_and_rounding():
    assert resolved(init_image=encode(picture())).init.strength == 0.8
    assert resolved(init_image=encode(picture()), mask_image=encode(box_mask())).init.strength == 1.0
    assert resolved(init_image=encode(picture()), strength=float(np.float32(0.7))).init.strength == 0.7
    assert refused(init_image=encode(picture()), strength=1.5).field == "strength"
    assert refused(init_image=encode(picture()), strength=float("nan")).field == "strength"


@pytest.mark.parametrize(("fields", "field", "message"), [
    (dict(strength=0.5), "strength", "needs init_image (the image to start from)"),
    (dict(mask_image=b"x"), "mask_image", "needs init_image (the image to start from)"),
    (dict(init_image=b"x", keep_unmasked=True), "keep_unmasked", "needs mask_image"),
    (dict(init_image=b"x", mask_image=b"y", mask_blur=65), "mask_blur", "must be between 0 and 64 pixels, got 65"),
    (dict(hires=HiresParams(scale=2.0, width=128)), "hires.scale", "give hires.scale or hires.width and hires.height, not both"),
    (dict(hires=HiresParams(width=128)), "hires.height", "give both hires.width and hires.height (or hires.scale)"),
    (dict(hires=HiresParams(scale=0.5)), "hires.scale", "must be at least 1, got 0.5"),
    (dict(hires=HiresParams(scale=8.0)), "hires.scale", "8 makes 512x512, over the model's largest size 256"),
    (dict(hires=HiresParams(steps=500)), "hires.steps", "must be between 1 and 200, got 500"),
    (dict(hires=HiresParams(strength=-0.1)), "hires.strength", "must be between 0 and 1, got -0.1"),
])
def test_field_dependencies_and_ranges_are_checked_before_decoding(fields, field, message):
    error = refused(**fields)  # b"x" is no image: these fail before anything is decoded
    assert (error.field, str(error)) == (field, f"{field}: {message}")


def test_the_mask_must_have_the_init_images_size():
    error = refused(init_image=encode(picture(64, 64)), mask_image=encode(box_mask(32, 32)))
    assert str(error) == "mask_image: is 32x32; it must have the init image's size, 64x64"


def test_mask_blur_softens_the_mask_at_the_output_size():
    sharp = resolved(init_image=encode(picture()), mask_image=encode(box_mask()))
    soft = resolved(init_image=encode(picture()), mask_image=encode(box_mask()), mask_blur=3)
    assert set(np.unique(sharp.init.mask)) == {0, 255}
    assert len(np.unique(soft.init.mask)) > 10 and soft.init.mask_blur == 3


def test_hires_defaults_and_sizes():
    hires = resolved(steps=12, hires=HiresParams()).hires
    assert (hires.width, hires.height, hires.steps, hires.strength, hires.upscaler) == (
        128, 128, 12, 0.5, Upscaler.LATENT_BICUBIC
    )
    assert (resolved(width=72, height=64, hires=HiresParams(scale=1.5)).hires.width) == 104  # 108 rounded down
    request = resolved(hires=HiresParams(width=128, height=96, steps=3, strength=0.3, upscaler=Upscaler.LANCZOS))
    assert (request.output_width, request.output_height) == (128, 96)


def test_a_model_without_a_vae_encoder_refuses_image_inputs():
    model = dataclasses.replace(MODEL, config=dataclasses.replace(MODEL.config, has_vae_encoder=False))
    assert not model.image_support.img2img and model.image_support.hires
    with pytest.raises(FailedPrecondition, match="^init_image: model 'scripted' has no VAE encoder"):
        resolve(GenerationParams(prompt="x", init_image=encode(picture())), model)
    with pytest.raises(FailedPrecondition, match="^hires.upscaler UPSCALER_LANCZOS: model 'scripted' has no VAE"):
        resolve(GenerationParams(prompt="x", hires=HiresParams(upscaler=Upscaler.LANCZOS)), model)
    assert resolve(GenerationParams(prompt="x", hires=HiresParams()), model).hires.width == 128


def test_cache_keys_tell_images_strengths_and_passes_apart():
    base = dict(init_image=encode(picture(seed=1)), strength=0.5)
    keys = {
        result_key(resolved(), MODEL),
        result_key(resolved(**base), MODEL),
        result_key(resolved(init_image=encode(picture(seed=2)), strength=0.5), MODEL),
        result_key(resolved(init_image=base["init_image"], strength=0.6), MODEL),
        result_key(resolved(**base, mask_image=encode(box_mask())), MODEL),
        result_key(resolved(**base, mask_image=encode(box_mask()), keep_unmasked=True), MODEL),
        result_key(resolved(hires=HiresParams()), MODEL),
        result_key(resolved(hires=HiresParams(strength=0.4)), MODEL),
    }
    assert len(keys) == 8
    assert result_key(resolved(**base), MODEL) == result_key(resolved(**base), MODEL)


def test_cached_results_hold_no_decoded_input_images():
    request = resolved(init_image=encode(picture(256, 256)), mask_image=encode(box_mask(256, 256)))
    entry = CachedResult.of(EncodedResult(request=request, model="scripted", backend="scripted", images=()))
    assert entry.result.request.init is None  # the pixels are not kept beyond the byte bound's count
    assert entry.answer(request).request is request and entry.answer(request).from_cache
