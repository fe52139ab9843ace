"""The pipeline reproduces diffusers' StableDiffusionPipeline for the same components and seed."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusiond.pipeline.request import GenerationRequest
from diffusiond.pipeline.schedulers import SCHEDULERS

# Float images in [0, 1]; both sides run the same fp32 modules on the same inputs.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(builtin_dir):
    pipe = StableDiffusionPipeline.from_pretrained(builtin_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)  # the model's own scheduler config, before tests swap it


def use_scheduler(reference, name: str):
    pipe, model_config = reference
    spec = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(model_config, **spec.overrides)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras", "unipc", "euler"])
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_images_match_diffusers(pipeline, reference, scheduler, negative):
    pipe = use_scheduler(reference, scheduler)
    request = GenerationRequest(
        request_id="parity", model="builtin", prompt="a red fox in the snow", negative_prompt=negative,
        width=64, height=72, steps=8, guidance_scale=7.5, seed=1234, num_images=2, scheduler=scheduler,
    )
    ours = pipeline.generate(request).images
    expected = pipe(
        "a red fox in the snow",
        negative_prompt=negative or None,
        height=72,
        width=64,
        num_inference_steps=8,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1235)],
        output_type="np",
    ).images
    assert ours.shape == expected.shape == (2, 72, 64, 3)
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_no_guidance_matches_diffusers(pipeline, reference):
    """guidance_scale <= 1 runs one UNet pass per step, as diffusers does."""
    pipe = use_scheduler(reference, "ddim")
    request = GenerationRequest(
        request_id="parity", model="builtin", prompt="a blue house", negative_prompt="",
        width=64, height=64, steps=5, guidance_scale=1.0, seed=7, num_images=1, scheduler="ddim",
    )
    ours = pipeline.generate(request).images
    expected = pipe(
        "a blue house", height=64, width=64, num_inference_steps=5, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7), output_type="np",
    ).images
    assert np.abs(ours - expected).max() <= TOLERANCE
