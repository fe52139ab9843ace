"""FID and Inception Score: from a local TorchScript network (a tiny one built here), or the built-in stand-in."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.eval import fidelity
from diffusiond.eval.run import EvalSettings, evaluate
from diffusiond.models.builtin import builtin_model_dir
from diffusiond.training import dataset


class TinyInception(torch.nn.Module):
    """The interface of the FID Inception-v3 TorchScript: features with return_features, else probabilities."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float() / 255.0, size=(32, 32), mode="bilinear")
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        if return_features:
            return features
        return torch.softmax(x.mean(dim=(2, 3)) * 50.0, dim=1)  # three classes: the dominant channel


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "tiny-inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def renders(count: int, seed: int) -> list[np.ndarray]:
    scenes = dataset.split("test")[:count]
    return [dataset.render(s, dataset.place(s, random.Random(seed + i))) for i, s in enumerate(scenes)]


def solid(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.full((64, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(count)]


def test_fid_is_near_zero_for_one_set_and_large_for_different_ones(inception_file):
    network = fidelity.FeatureNetwork.from_file(inception_file)
    shapes = renders(40, seed=0)
    same = fidelity.score(shapes, shapes, network)
    redrawn = fidelity.score(renders(40, seed=1000), shapes, network)  # the same scenes, placed anew
    other = fidelity.score(solid(40, seed=1), shapes, network)
    assert abs(same.fid) < 1e-6
    assert 1e-6 < redrawn.fid < other.fid / 3
    assert (same.generated, same.reference) == (40, 40)
    assert same.features.startswith("tiny-inception.pt (16 features)")


def test_inception_score_counts_distinct_confident_classes(inception_file):
    network = fidelity.FeatureNetwork.from_file(inception_file)
    one_image = [solid(1, seed=3)[0]] * 20
    varied = solid(200, seed=4)
    assert fidelity.score(one_image, one_image, network).inception_score == pytest.approx(1.0, abs=1e-3)
    assert fidelity.score(varied, one_image, network).inception_score > 2.0  # of at most 3


def test_feature_network_file_must_be_local_torchscript(tmp_path):
    with pytest.raises(FailedPrecondition, match="never downloaded"):
        fidelity.FeatureNetwork.from_file(tmp_path / "absent.pt")
    state_dict = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, state_dict)
    with pytest.raises(FailedPrecondition, match="not a TorchScript module"):
        fidelity.FeatureNetwork.from_file(state_dict)


def test_stand_in_ranks_real_renders_closer_than_solid_colours():
    network = fidelity.FeatureNetwork.stand_in(builtin_model_dir(), 64)
    assert network.logits is None and "not comparable" in network.label
    reference = renders(60, seed=0)
    other_draws = fidelity.score(renders(60, seed=1000), reference, network)
    colours = fidelity.score(solid(60, seed=2), reference, network)
    assert other_draws.fid < colours.fid / 3
    assert other_draws.inception_score is None


def test_fid_needs_two_images_a_side(inception_file):
    network = fidelity.FeatureNetwork.from_file(inception_file)
    with pytest.raises(InvalidArgument, match="at least 2"):
        fidelity.score(renders(1, 0), renders(5, 0), network)


def test_eval_reports_fid_and_inception_score(inception_file, tmp_path):
    report = evaluate(EvalSettings(num_prompts=4, steps=2, batch_size=4, inception_weights=str(inception_file)))
    assert report.fidelity is not None
    assert report.fidelity["generated"] == report.fidelity["reference"] == 4
    assert report.fidelity["fid"] >= 0 and report.fidelity["inception_score"] >= 1.0
    assert "FID" in report.table() and "IS" in report.table()

    stand_in = evaluate(EvalSettings(num_prompts=4, steps=2, batch_size=4, fid=True))
    assert stand_in.fidelity["features"] == fidelity.STAND_IN_LABEL
    assert stand_in.fidelity["inception_score"] is None

    reference = tmp_path / "reference"
    reference.mkdir()
    from PIL import Image

    for i, image in enumerate(renders(3, seed=7)):
        Image.fromarray(image).resize((128, 128)).save(reference / f"{i}.png")
    from_dir = evaluate(EvalSettings(num_prompts=4, steps=2, batch_size=4, fid=True, reference=str(reference)))
    assert from_dir.fidelity["reference"] == 3
