"""The optional content filter: a tiny safety checker built here flags one known image.

The checker is diffusers' StableDiffusionSafetyChecker with a tiny random CLIP
vision tower; its first concept embedding is set to the embedding of a known
image (the built-in model's output for one prompt and seed) and its threshold
half way between that image and another one, so exactly the known image is
flagged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import running_server
from images import pixels

from diffusiond.client import ClientError, DiffusionClient
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread

KNOWN = dict(prompt="a large red circle on a blue background, top left", seed=3, steps=4)
OTHER = dict(prompt="a small yellow triangle on a black background, bottom right", seed=4, steps=4)


def build_checker(directory: Path, known: np.ndarray, other: np.ndarray) -> Path:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        clip_input = processor([known, other], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        unit = torch.nn.functional.normalize(embeds)
        between = float(unit[0] @ unit[1])
        assert between < 0.999, "the two test images must embed apart"
        checker.concept_embeds[0] = embeds[0]
        checker.concept_embeds_weights.fill_(2.0)  # cosines never exceed 1: no other concept fires
        checker.concept_embeds_weights[0] = (1.0 + between) / 2
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def filtering_server(builtin_dir, client, tmp_path_factory) -> Iterator[ServerThread]:
    known = pixels(client.generate(**KNOWN).images[0].data)
    other = pixels(client.generate(**OTHER).images[0].data)
    checker = build_checker(tmp_path_factory.mktemp("checker"), known, other)
    settings = ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))],
                              safety_checker=str(checker))
    with running_server(settings) as thread:
        yield thread


def test_a_flagged_image_is_sent_black_and_marked(filtering_server, client):
    before = filtering_server.server.metrics.registry.get_sample_value(
        "diffusiond_images_filtered_total", {"model": "builtin"}) or 0.0
    with DiffusionClient(filtering_server.address, timeout=60) as c:
        flagged = c.generate(**KNOWN)
        clean = c.generate(**OTHER)
    (image,) = flagged.response.images
    assert image.filtered and not pixels(image.data).any()
    assert any("withheld" in w and "0" in w for w in flagged.response.warnings)
    assert not clean.response.images[0].filtered
    assert clean.images[0].data == client.generate(**OTHER).images[0].data  # unfiltered images are untouched
    after = filtering_server.server.metrics.registry.get_sample_value(
        "diffusiond_images_filtered_total", {"model": "builtin"})
    assert after == before + 1


def test_previews_are_filtered_too_and_latent_previews_refused(filtering_server):
    with DiffusionClient(filtering_server.address, timeout=60) as c:
        events = list(c.stream(**KNOWN, preview="full"))
        last_preview = [e.step for e in events if e.WhichOneof("event") == "step"][-1].previews[0]
        assert not pixels(last_preview.data).any()  # the last step's preview is the flagged image: black
        with pytest.raises(ClientError) as info:
            list(c.stream(**KNOWN, preview="latent"))
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and "safety checker" in info.value.details
