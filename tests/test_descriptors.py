"""Model descriptors: the one statement of each network's inputs, outputs, dynamic axes and profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusiond.errors import InvalidArgument
from diffusiond.models.descriptors import (
    COMPONENTS,
    UNET_SHALLOW,
    Range,
    SDDims,
    ShapeProfile,
    descriptors_for,
    sd_descriptors,
)

SD15 = SDDims(
    latent_channels=4, unet_in_channels=4, unet_out_channels=4, vae_scale_factor=8,
    text_max_length=77, text_hidden_size=768, vocab_size=49408, num_train_timesteps=1000,
    deep_channels=(640, 1280, 1280),
)


def test_names_follow_optimums_layout():
    d = sd_descriptors(SD15)
    assert tuple(d) == tuple(c for c in COMPONENTS if c != UNET_SHALLOW)  # no step caching asked for
    assert d["text_encoder"].input_names == ["input_ids"]
    assert d["text_encoder"].output_names == ["last_hidden_state", "pooler_output"]
    assert d["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert d["unet"].output_names == ["out_sample"]
    assert (d["vae_decoder"].input_names, d["vae_decoder"].output_names) == (["latent_sample"], ["sample"])
    assert (d["vae_encoder"].input_names, d["vae_encoder"].output_names) == (["sample"], ["latent_parameters"])


def test_step_caching_adds_the_deep_features_and_the_shallow_unet():
    d = sd_descriptors(SD15, step_cache_depth=2)
    assert d["unet"].output_names == ["out_sample", "deep_features"]
    assert d[UNET_SHALLOW].input_names == ["sample", "timestep", "encoder_hidden_states", "deep_features"]
    assert d[UNET_SHALLOW].output_names == ["out_sample"]
    # Depth 2 reads features one down block deep: 1280 channels, latents halved (rounding up).
    shapes = d[UNET_SHALLOW].shape_dict(2, 520, 512)
    assert shapes["deep_features"] == (2, 1280, 33, 32) and shapes["out_sample"] == (2, 4, 65, 64)
    with pytest.raises(InvalidArgument, match="step_cache_depth"):
        sd_descriptors(SD15, step_cache_depth=4)


def test_shape_dict_for_one_call():
    unet = sd_descriptors(SD15)["unet"]
    shapes = unet.shape_dict(batch=2, height=512, width=768)
    assert shapes == {
        "sample": (2, 4, 64, 96),
        "timestep": (2,),
        "encoder_hidden_states": (2, 77, 768),
        "out_sample": (2, 4, 64, 96),
    }
    encoder = sd_descriptors(SD15)["vae_encoder"]
    assert encoder.shape_dict(1, 256, 256) == {"sample": (1, 3, 256, 256), "latent_parameters": (1, 8, 32, 32)}


def test_dynamic_axes_cover_batch_and_size_but_not_channels():
    d = sd_descriptors(SD15)
    assert d["unet"].dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert d["unet"].dynamic_axes()["timestep"] == {0: "batch"}
    assert d["text_encoder"].dynamic_axes()["input_ids"] == {0: "batch"}  # 77 tokens are fixed
    assert d["vae_decoder"].dynamic_axes()["sample"] == {0: "batch", 2: "height", 3: "width"}


def test_input_profile_doubles_rows_for_the_guided_unet():
    profile = ShapeProfile(images=Range(1, 2, 4), height=Range(256, 512, 1024), width=Range(256, 512, 768))
    d = sd_descriptors(SD15)
    unet = d["unet"].input_profile(profile)
    assert unet["sample"] == ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 128, 96))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (4, 77, 768), (8, 77, 768))
    assert d["vae_decoder"].input_profile(profile)["latent_sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 96))


def test_sample_inputs_have_the_declared_dtypes_and_ranges():
    d = sd_descriptors(SD15)
    ids = d["text_encoder"].sample_inputs(2, 512, 512)["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 77) and 0 <= ids.min() and ids.max() < 49408
    unet = d["unet"].sample_inputs(2, 64, 72)
    assert unet["sample"].dtype == np.float32 and unet["sample"].shape == (2, 4, 8, 9)
    assert unet["timestep"].shape == (2,) and 0 <= unet["timestep"].min() and unet["timestep"].max() < 1000
    assert unet["timestep"][0] != unet["timestep"][1]  # rows at different steps: export traces and checks that
    image = d["vae_encoder"].sample_inputs(1, 64, 64)["sample"]
    assert -1 <= image.min() and image.max() <= 1


def test_bad_sizes_and_ranges_are_refused():
    with pytest.raises(InvalidArgument, match="multiple of the VAE factor 8"):
        sd_descriptors(SD15)["unet"].shape_dict(1, 100, 64)
    with pytest.raises(InvalidArgument, match="min <= opt <= max"):
        Range(4, 2, 8)


def test_read_from_a_model_directory(builtin_dir):
    d = descriptors_for(builtin_dir)
    dims = d["unet"].dims
    assert (dims.latent_channels, dims.vae_scale_factor, dims.text_max_length) == (4, 4, 32)
    width = json.loads((builtin_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    assert dims.text_hidden_size == width  # the built-in model's cross-attention width
    assert d["unet"].shape_dict(2, 64, 64)["encoder_hidden_states"] == (2, 32, width)
