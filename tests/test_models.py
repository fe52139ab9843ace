"""Model directories: ListModels, loading errors, serving any diffusers-format directory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffusiond.backends.base import BackendSettings
from diffusiond.errors import FailedPrecondition, NotFound
from diffusiond.eval.scorer import read_image
from diffusiond.models.config import load_model_config
from diffusiond.models.sources import ModelSource, resolve_model_dir
from diffusiond.pipeline.request import GenerationRequest
from diffusiond.pipeline.schedulers import SCHEDULERS
from diffusiond.service.limits import ModelLimits
from diffusiond.service.models import load_model


def test_list_models(client, builtin_dir):
    (info,) = client.list_models()
    assert info.name == "builtin" and info.is_default
    assert (info.backend, info.device, info.dtype) == ("torch", "cpu", "fp32")
    assert (info.default_width, info.default_height, info.size_multiple) == (64, 64, 4)  # latent factor 4
    # The built-in model's own defaults: its scheduler config and its diffusiond.json.
    defaults = json.loads((builtin_dir / "diffusiond.json").read_text())
    assert info.default_scheduler == "dpmpp_2m"
    assert info.default_steps == defaults["default_steps"] != 30
    assert info.default_guidance_scale == pytest.approx(defaults["default_guidance_scale"])
    # Zero terminal SNR: every scheduler that can rescale its betas, and none that cannot.
    assert set(info.schedulers) == set(SCHEDULERS) - {"pndm", "lms", "lms_karras"}
    vae = json.loads((builtin_dir / "vae" / "config.json").read_text())
    assert info.latent_channels == 4 and info.latent_scaling_factor == pytest.approx(vae["scaling_factor"])
    images = info.image_inputs
    assert (images.img2img, images.inpainting, images.inpainting_method, images.hires) == (
        True, True, "latent_blend", True
    )
    assert (images.max_image_bytes, images.max_image_pixels) == (8 * 2**20, 4096 * 4096)


def test_sampling_defaults_without_diffusiond_json_are_sd_defaults(tmp_path, builtin_dir):
    copy = tmp_path / "m"
    shutil.copytree(builtin_dir, copy)
    (copy / "diffusiond.json").unlink()
    limits = ModelLimits.for_model(load_model_config(copy))
    assert (limits.default_steps, limits.default_guidance_scale) == (30, 7.5)
    (copy / "diffusiond.json").write_text(json.dumps({"default_steps": 12}))
    limits = ModelLimits.for_model(load_model_config(copy))
    assert (limits.default_steps, limits.default_guidance_scale) == (12, 7.5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"default_steps": 0}, "default_steps must be a positive integer"),
        ({"default_steps": "20"}, "default_steps must be a positive integer"),
        ({"default_guidance_scale": -1}, "default_guidance_scale must be a number"),
        ({"default_sampler": "euler"}, "unknown keys default_sampler"),
        ({"default_steps": 500}, "default steps 500 is outside 1..200"),
    ],
)
def test_bad_diffusiond_json_is_refused(tmp_path, builtin_dir, content, message):
    copy = tmp_path / "m"
    shutil.copytree(builtin_dir, copy)
    (copy / "diffusiond.json").write_text(json.dumps(content))
    with pytest.raises(FailedPrecondition, match=message):
        ModelLimits.for_model(load_model_config(copy))


def test_builtin_is_a_standard_diffusers_layout(builtin_dir):
    index = json.loads((builtin_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (builtin_dir / sub).is_dir()
    config = load_model_config(builtin_dir)
    assert (config.vae_scale_factor, config.latent_channels, config.default_size) == (4, 4, 64)


def test_model_source_parsing():
    assert ModelSource.parse("builtin") == ModelSource("builtin", "builtin")
    assert ModelSource.parse("/models/sd15/") == ModelSource("sd15", "/models/sd15/")
    assert ModelSource.parse("fast=/models/sd15") == ModelSource("fast", "/models/sd15")


def test_missing_directory_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_directory_without_model_index(tmp_path):
    with pytest.raises(NotFound, match="model_index.json"):
        load_model_config(tmp_path)


def test_unsupported_pipeline_class(tmp_path, builtin_dir):
    copy = tmp_path / "m"
    shutil.copytree(builtin_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FailedPrecondition, match="KandinskyPipeline"):
        load_model_config(copy)


def test_any_local_directory_loads_under_its_name(tmp_path, builtin_dir, pipeline):
    copy = tmp_path / "my-model"
    shutil.copytree(builtin_dir, copy)
    source = ModelSource.parse(str(copy))
    model = load_model(source.name, resolve_model_dir(source.location))
    assert model.name == "my-model"
    request = GenerationRequest("r", "my-model", "a fox", "", 64, 64, 3, 7.5, 5, 1, "ddim")
    ours = model.pipeline.generate(request).images
    reference = pipeline.generate(request).images
    assert np.array_equal(ours, reference)


def test_bf16_runs_close_to_fp32(builtin_dir, pipeline):
    model = load_model("bf16", builtin_dir, settings=BackendSettings(dtype="bf16"))
    assert model.backend.dtype_name == "bf16"
    request = GenerationRequest("r", "bf16", "a large red circle on a blue background, top left", "",
                                64, 64, 4, 4.0, 5, 1, "ddim")
    low = model.pipeline.generate(request).images
    full = pipeline.generate(request).images
    assert np.isfinite(low).all()
    # bf16 keeps 8 mantissa bits; the picture stays the same picture: the scorer reads it the same.
    assert np.abs(low - full).mean() < 0.08
    assert read_image(low[0]) == read_image(full[0])
