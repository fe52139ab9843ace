"""Previews per model: a latent-to-RGB projection fitted to the model's VAE, and a tiny preview decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusiond.client.cli import best_preview_kind
from diffusiond.errors import FailedPrecondition
from diffusiond.eval.preview_fidelity import compare_projections, measure
from diffusiond.models import latent_rgb
from diffusiond.models.builtin import builtin_model_dir
from diffusiond.models.config import load_model_config
from diffusiond.pipeline import previews, tiny_decoder
from diffusiond.pipeline.observers import NullObserver
from diffusiond.pipeline.request import PreviewKind
from diffusiond.service.image_inputs import HiresParams
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, PreviewParams, preview_kinds, resolve
from diffusiond.training import dataset

# The last step's APPROX_RGB preview against the final image box-filtered to the preview's size (16x16: one
# colour per latent pixel), on the built-in model v3 (BENCHMARKS.md, "Previews"): over 32 held-out prompts the
# shipped projection measured 17.2 dB mean, 11.2 worst (32.4 levels mean error); SD 1.x's factors, which every
# model got before, 8.4 dB mean, 5.1 worst (85.4 levels). The bounds leave about 2 and 3.5 dB of margin.
MIN_PSNR_DB = 9.0  # every prompt, with the shipped projection
MIN_GAIN_DB = 5.0  # mean PSNR, the shipped projection over SD 1.x's factors


@pytest.fixture(scope="module")
def builtin_model():
    model = load_model("builtin", builtin_model_dir())
    yield model
    model.backend.close()


def test_fit_recovers_a_linear_decoder():
    weights = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2]])
    bias = torch.tensor([0.1, -0.05, 0.0])
    scaling = 0.5

    def decode(unscaled: torch.Tensor) -> torch.Tensor:  # each latent pixel becomes a 4x4 patch of one colour
        rgb = torch.einsum("bchw,cr->brhw", unscaled * scaling, weights) + bias.view(1, 3, 1, 1)
        return rgb.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).clamp(-1, 1)

    def encode(images: torch.Tensor) -> torch.Tensor:  # any latents will do; these vary with the images
        pooled = torch.nn.functional.avg_pool2d(images, 4)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True) ** 2], dim=1)[:, :3] / scaling * 0.6

    fitted = latent_rgb.fit(encode, decode, scaling, 4, 3, source="test")
    np.testing.assert_allclose(np.array(fitted.weights), weights.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.array(fitted.bias), bias.numpy(), atol=2e-3)
    random_fit = latent_rgb.fit(None, decode, scaling, 4, 3, source="test")
    np.testing.assert_allclose(np.array(random_fit.weights), weights.numpy(), atol=0.05)


def test_published_factors_are_recognised_from_the_vae_config():
    sd = {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215}
    assert latent_rgb.recognised(sd) is latent_rgb.SD_PROJECTION
    assert latent_rgb.recognised({**sd, "scaling_factor": 0.13025}) is latent_rgb.SDXL_PROJECTION
    assert latent_rgb.recognised({**sd, "block_out_channels": [8, 16, 32]}) is None
    assert latent_rgb.recognised({**sd, "scaling_factor": 0.3}) is None


def test_the_built_in_model_ships_its_projection():
    shipped = latent_rgb.read_model_file(builtin_model_dir())
    assert shipped is not None and shipped.channels == load_model_config(builtin_model_dir()).latent_channels
    assert shipped.weights != latent_rgb.SD_FACTORS


def test_unknown_vae_is_fitted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from diffusiond.models.synthetic import write_sd_model

    model_dir = tmp_path / "tiny"
    write_sd_model(model_dir, "tiny")
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    (model_dir / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))
    monkeypatch.setenv("DIFFUSIOND_CACHE", str(tmp_path / "cache"))
    model = load_model("tiny", model_dir)
    fitted = model.pipeline.latent_rgb
    assert fitted.source.startswith("fitted to tiny's VAE")
    assert len(list((tmp_path / "cache" / "latent_rgb").glob("*.json"))) == 1

    def no_fitting(*args, **kwargs):
        raise AssertionError("fitted again instead of reading the cache")

    monkeypatch.setattr(latent_rgb, "fit", no_fitting)
    config = load_model_config(model_dir)
    assert previews.load_projection(model_dir, config, model.backend).weights == fitted.weights
    (model_dir / latent_rgb.MODEL_FILE).write_text(json.dumps({"weights": [[1, 0, 0]] * 4, "source": "shipped"}))
    assert previews.load_projection(model_dir, config, model.backend).source == "shipped"


def test_last_approx_rgb_preview_looks_like_the_image(builtin_model):
    own = builtin_model.pipeline.latent_rgb
    assert own == latent_rgb.read_model_file(builtin_model_dir())
    prompts = [scene.caption for scene in dataset.held_out_prompts(6)]
    both = compare_projections(builtin_model, prompts, list(range(6)),
                               {"shipped": own, "sd": latent_rgb.SD_PROJECTION})
    latent_size = builtin_model.config.unet_sample_size
    assert all(r.preview_size == (latent_size, latent_size) for r in both["shipped"])
    assert min(r.psnr_db for r in both["shipped"]) >= MIN_PSNR_DB
    gain = np.mean([r.psnr_db for r in both["shipped"]]) - np.mean([r.psnr_db for r in both["sd"]])
    assert gain >= MIN_GAIN_DB
    assert builtin_model.pipeline.latent_rgb is own
    # The preview the pipeline itself sends is the one measured.
    (sent,) = measure(builtin_model, prompts[:1], [0])
    assert sent.psnr_db == pytest.approx(both["shipped"][0].psnr_db, abs=1e-9)


@pytest.fixture(scope="module")
def preview_decoder_dir(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("taesd") / "preview_decoder"
    # n blocks, n - 1 2x upsamplings: the built-in model's latent factor (8: four blocks).
    blocks = load_model_config(builtin_model_dir()).vae_scale_factor.bit_length()
    AutoencoderTiny(encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
                    num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks, latent_channels=4,
                    upsampling_scaling_factor=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_decoder_model(preview_decoder_dir):
    model = load_model("builtin", builtin_model_dir(), preview_decoder=preview_decoder_dir)
    yield model
    model.backend.close()


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.steps: list = []

    def on_step(self, info) -> None:
        self.steps.append(info)


def test_tiny_decoder_previews_are_full_size_and_listed_first(tiny_decoder_model):
    model = tiny_decoder_model
    assert preview_kinds(model)[0] is PreviewKind.TINY_DECODER
    params = GenerationParams(prompt="a large red circle on a blue background, top left", seed=0, steps=3,
                              preview=PreviewParams(PreviewKind.TINY_DECODER, every_n_steps=1))
    observer = Recorder()
    result = model.pipeline.generate(resolve(params, model), observer)
    # Previews at the image's size (8x the APPROX_RGB side), where APPROX_RGB gives one colour per latent pixel.
    assert [s.preview.shape for s in observer.steps] == [result.images.shape] * 3 == [(1, 64, 64, 3)] * 3
    assert all(s.preview_kind is PreviewKind.TINY_DECODER and s.preview.dtype == np.uint8 for s in observer.steps)


def test_tiny_decoder_previews_have_the_hires_pass_size(tiny_decoder_model):
    params = GenerationParams(prompt="a blue square", seed=1, steps=2, hires=HiresParams(scale=2.0, strength=0.5),
                              preview=PreviewParams(PreviewKind.TINY_DECODER, every_n_steps=1))
    observer = Recorder()
    tiny_decoder_model.pipeline.generate(resolve(params, tiny_decoder_model), observer)
    assert [s.preview.shape for s in observer.steps] == [(1, 64, 64, 3)] * 2 + [(1, 128, 128, 3)]


def test_a_safety_checker_blanks_flagged_tiny_decoder_previews(tiny_decoder_model):
    class FlagsEverything:
        def blank_flagged(self, images: np.ndarray) -> list[bool]:
            images[:] = 0
            return [True] * len(images)

    params = GenerationParams(prompt="a red circle", seed=2, steps=2,
                              preview=PreviewParams(PreviewKind.TINY_DECODER, every_n_steps=1))
    observer = Recorder()
    tiny_decoder_model.pipeline.safety = FlagsEverything()
    try:
        tiny_decoder_model.pipeline.generate(resolve(params, tiny_decoder_model), observer)
    finally:
        tiny_decoder_model.pipeline.safety = None
    assert len(observer.steps) == 2 and not any(s.preview.any() for s in observer.steps)


def test_tiny_decoder_preview_needs_a_decoder(builtin_model):
    assert PreviewKind.TINY_DECODER not in preview_kinds(builtin_model)
    assert preview_kinds(builtin_model)[0] is PreviewKind.APPROX_RGB
    params = GenerationParams(prompt="a red circle", preview=PreviewParams(PreviewKind.TINY_DECODER))
    with pytest.raises(FailedPrecondition, match="no tiny preview decoder"):
        resolve(params, builtin_model)


def test_a_model_directory_can_ship_its_preview_decoder(tmp_path, preview_decoder_dir):
    assert tiny_decoder.find(tmp_path, None) is None
    (tmp_path / tiny_decoder.MODEL_SUBDIR).mkdir()
    assert tiny_decoder.find(tmp_path, None) == tmp_path / tiny_decoder.MODEL_SUBDIR
    assert tiny_decoder.find(tmp_path, preview_decoder_dir) == preview_decoder_dir
    with pytest.raises(FailedPrecondition, match="decodes 4-channel latents; the model has 8"):
        tiny_decoder.TinyDecoder.load(preview_decoder_dir, torch.device("cpu"), latent_channels=8)


def test_cli_asks_for_the_models_best_preview():
    from diffusiond.api.v1 import diffusion_pb2 as pb

    class Client:
        def list_models(self, timeout=None):
            return [pb.ModelInfo(name="a", is_default=True, preview_kinds=[pb.PREVIEW_KIND_APPROX_RGB]),
                    pb.ModelInfo(name="b", preview_kinds=[pb.PREVIEW_KIND_TINY_DECODER, pb.PREVIEW_KIND_APPROX_RGB]),
                    pb.ModelInfo(name="old")]

    assert best_preview_kind(Client(), "", None) == pb.PREVIEW_KIND_APPROX_RGB
    assert best_preview_kind(Client(), "b", None) == pb.PREVIEW_KIND_TINY_DECODER
    assert best_preview_kind(Client(), "old", None) == pb.PREVIEW_KIND_APPROX_RGB  # a server without the field


def test_the_shipped_projection_is_what_the_fitting_command_writes(tmp_path):
    import shutil

    from diffusiond.training import preview_projection

    shutil.copytree(builtin_model_dir() / "vae", tmp_path / "vae")
    assert preview_projection.main(["--model", str(tmp_path)]) == 0
    refitted = latent_rgb.read_model_file(tmp_path)
    shipped = latent_rgb.read_model_file(builtin_model_dir())
    np.testing.assert_allclose(np.array(refitted.weights), np.array(shipped.weights), atol=1e-4)
    assert refitted.source == shipped.source
    assert preview_projection.main(["--model", str(tmp_path / "absent")]) == 2


def test_serve_preview_decoder_flag_names_a_served_model():
    from diffusiond.cli import _preview_decoders
    from diffusiond.models.sources import ModelSource
    from diffusiond.server.app import ServerSettings

    assert _preview_decoders(["/taesd"], "builtin") == {"builtin": "/taesd"}
    assert _preview_decoders(["other=/taesdxl", "/taesd"], "builtin") == {"other": "/taesdxl", "builtin": "/taesd"}
    with pytest.raises(ValueError, match="give a directory"):
        _preview_decoders(["other="], "builtin")
    with pytest.raises(ValueError, match="names model\\(s\\) not served: other"):
        ServerSettings(models=[ModelSource("builtin", "builtin")], preview_decoders={"other": "/taesd"})
