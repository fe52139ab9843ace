"""The training script on a micro recipe: it trains, resumes exactly, and writes a servable model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusiond.eval.run import EvalSettings, evaluate
from diffusiond.models import latent_rgb
from diffusiond.models.config import load_model_config
from diffusiond.service.models import load_model
from diffusiond.training.recipe import RECIPES
from diffusiond.training.train import Trainer, main

MICRO = RECIPES["micro"]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"vae.{k}": v for k, v in trainer.vae.state_dict().items()}
    state.update({f"unet.{k}": v for k, v in trainer.unet.state_dict().items()})
    state.update({f"text.{k}": v for k, v in trainer.text_encoder.state_dict().items()})
    state.update({f"heads.{k}": v for k, v in trainer.attribute_heads.state_dict().items()})
    state.update({f"ema.{i}": v for i, v in enumerate(trainer.ema)})
    return state


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The micro recipe trained in one go."""
    work = tmp_path_factory.mktemp("straight")
    trainer = Trainer(MICRO, work, progress=False)
    assert trainer.run()
    return trainer


def test_resumed_run_equals_uninterrupted_run(straight, tmp_path):
    # A zero budget stops after every step with a checkpoint; each round starts a fresh Trainer from it.
    rounds = 0
    while not Trainer(MICRO, tmp_path, budget_s=0, progress=False).run():
        rounds += 1
        assert rounds < 20
    assert rounds == sum(steps - 1 for steps in (MICRO.vae_steps, MICRO.diffusion_steps, MICRO.decoder_steps,
                                                  MICRO.refine_steps))
    resumed = Trainer(MICRO, tmp_path, progress=False)
    assert resumed.stage == "done"
    assert resumed.scaling_factor == straight.scaling_factor
    ours, theirs = _weights(resumed), _weights(straight)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []


def test_the_fingerprint_covers_what_decides_the_weights_and_not_the_sampling_defaults():
    assert MICRO.replace(default_guidance_scale=7.5, default_steps=30).fingerprint() == MICRO.fingerprint()
    assert MICRO.replace(text_attribute_weight=0.0).fingerprint() != MICRO.fingerprint()
    assert MICRO.replace(decoder_lr=1e-3).fingerprint() != MICRO.fingerprint()
    assert MICRO.replace(refine_shape_weight=2.0).fingerprint() != MICRO.fingerprint()
    # A skipped stage's settings decide nothing, so they leave the fingerprint alone.
    without = MICRO.replace(refine_steps=0)
    assert without.replace(refine_shape_weight=2.0).fingerprint() == without.fingerprint() != MICRO.fingerprint()


@pytest.mark.parametrize("stage", ["decoder", "refine"])
def test_an_optional_stage_extends_a_finished_run_exactly(straight, tmp_path, stage):
    without = MICRO.without_stages_from(stage)
    assert Trainer(without, tmp_path, progress=False).run()
    finished = _weights(Trainer(without, tmp_path, progress=False))
    changed = "vae.decoder.conv_out.weight" if stage == "decoder" else "unet.conv_out.weight"
    assert not torch.equal(finished[changed], _weights(straight)[changed])
    extended = Trainer(MICRO, tmp_path, progress=False)
    assert extended.stage == stage
    assert extended.run()
    ours, theirs = _weights(extended), _weights(straight)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert torch.equal(ours["vae.encoder.conv_in.weight"], finished["vae.encoder.conv_in.weight"])  # frozen


def test_refine_weights_the_shape_and_draws_more_small_shapes(straight):
    from diffusiond.training import dataset
    from diffusiond.training.train import data_seed, pick_by_size, shape_weight_map, stage_generator

    is_small = torch.arange(1000) % 2 == 0
    picked = pick_by_size(is_small, stage_generator(0, "refine", 0), 400, 0.75)
    assert 0.65 < is_small[picked].float().mean() < 0.85
    # The coverage the refine stage weights is the very shape drawn in the training image.
    seed = data_seed(MICRO.seed, "latents")
    scene, image = dataset.sample(straight.train_scenes, seed, 7)
    same_scene, coverage = dataset.sample_coverage(straight.train_scenes, seed, 7)
    assert same_scene == scene
    covered = coverage > 0.5
    background = np.array(dataset.COLOURS[scene.background])
    differs = np.abs(image.astype(int) - background).sum(axis=-1) > 60
    assert covered.sum() > 50 and (covered == differs).mean() > 0.97
    # On the latent grid: the weight is 1 far from the shape and 1 + shape_weight where it covers a whole pixel.
    coverage = torch.from_numpy(coverage)[None, None]
    weight = shape_weight_map(coverage, 4, 8.0)[0, 0]
    assert weight.shape == (16, 16) and weight.min() == 1.0 and weight.max() == 9.0
    assert 4 < int((weight > 1).sum()) < 120


def test_the_pixel_weight_moves_the_loss_within_a_row_not_between_rows():
    from diffusiond.training.train import denoising_loss

    prediction, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    prediction[:, :, 0, 0] = 1.0  # an error in one pixel of each row
    row_weight = torch.tensor([1.0, 3.0])
    plain = denoising_loss(prediction, target, row_weight)
    assert plain.item() == pytest.approx((1 + 3) / 2 / 64)
    uniform = denoising_loss(prediction, target, row_weight, torch.full((2, 1, 8, 8), 5.0))
    assert uniform.item() == pytest.approx(plain.item())
    on_error = torch.ones(2, 1, 8, 8)
    on_error[:, :, 0, 0] = 9.0  # that pixel weighted up: its share of each row's mean weight grows
    assert denoising_loss(prediction, target, row_weight, on_error).item() == pytest.approx(plain.item() * 9 * 64 / 72)


def test_training_changes_the_weights(straight, tmp_path):
    fresh = Trainer(MICRO, tmp_path, progress=False)
    trained, initial = _weights(straight), _weights(fresh)
    assert not torch.equal(trained["unet.conv_in.weight"], initial["unet.conv_in.weight"])
    assert not torch.equal(trained["vae.encoder.conv_in.weight"], initial["vae.encoder.conv_in.weight"])
    assert all(np.isfinite(v).all() for v in straight.losses.values())


def test_checkpoint_of_another_recipe_is_refused(straight, tmp_path):
    Trainer(MICRO, tmp_path, budget_s=0, progress=False).run()
    with pytest.raises(SystemExit, match="another recipe"):
        Trainer(MICRO.replace(diffusion_steps=5), tmp_path, progress=False)


def test_exported_model_serves_and_evaluates(straight, tmp_path):
    out = tmp_path / "model"
    straight.export(out)
    config = load_model_config(out)
    assert (config.vae_scale_factor, config.latent_channels, config.default_size) == (4, 4, 64)
    assert latent_rgb.read_model_file(out).channels == 4
    assert config.scaling_factor == pytest.approx(straight.scaling_factor, rel=1e-4)
    assert config.sampling_defaults.steps == MICRO.default_steps
    assert json.loads((out / "training.json").read_text())["stage"] == "done"
    from diffusiond.export.calibration import CalibrationSettings, for_model

    prompts = for_model(CalibrationSettings(), out).prompts()
    assert len(prompts) == 32 and all(p.endswith(("left", "right", "top", "bottom", "center")) for p in prompts)
    model = load_model("micro", out)
    assert model.schedulers.default_name == "dpmpp_2m"
    assert model.limits.default_guidance_scale == MICRO.default_guidance_scale
    # APPROX_RGB previews use the projection fitted to this VAE at export, not SD's factors.
    assert model.pipeline.latent_rgb.source == "least squares over 256 training renders decoded by this VAE"

    report = evaluate(EvalSettings(model=f"micro={out}", num_prompts=3, steps=2, batch_size=2,
                                   save_images=str(tmp_path / "images")))
    assert report.num_prompts == 3 and len(report.prompts) == 3
    assert set(report.scores) == {"colour", "background", "shape", "position", "size", "all"}
    assert (report.backend, report.precision, report.steps) == ("torch", "fp32", 2)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0000.png", "0001.png", "0002.png", "sheet.png"]


def test_command_line_resumes_and_exports(tmp_path):
    args = ["--recipe", "micro", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--budget-minutes", "0"]) == 3  # out of time: checkpointed, nothing exported
    assert not (tmp_path / "out").exists()
    assert main(args) == 0
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_the_shipped_built_in_model_is_what_the_builtin_recipe_trains():
    from diffusiond.models.builtin import builtin_model_dir

    record = json.loads((builtin_model_dir() / "training.json").read_text())
    assert record["stage"] == "done"
    assert record["recipe_fingerprint"] == RECIPES["builtin"].fingerprint()
    assert record["recipe"] == RECIPES["builtin"].as_dict()
