"""``diffusiond train-lora``: seeded, resumable to the same weights, and its adapter is one the server loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusiond.cli import main as cli_main
from diffusiond.models.lora import inspect_file
from diffusiond.service.adapters import AdapterLibrary
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset
from diffusiond.training.lora_train import LoraTrainer, LoraTrainSettings


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lora-images")
    dataset.write_images(directory, dataset.split("train"), seed=1, count=6, style="framed")
    return directory


def settings(builtin_dir, images, out: Path, steps: int = 4) -> LoraTrainSettings:
    return LoraTrainSettings(model=str(builtin_dir), images=str(images), out=str(out), rank=2, steps=steps, lr=1e-2,
                             batch_size=2, seed=3, targets="attention")


def weights(trainer: LoraTrainer) -> dict[str, torch.Tensor]:
    return {f"{layer.module}.{part}": getattr(layer, part) for layer in trainer.lora_layers() for part in ("down", "up")}


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(builtin_dir, images, tmp_path):
    whole = LoraTrainer(settings(builtin_dir, images, tmp_path / "a.safetensors"), tmp_path / "whole", progress=False)
    assert whole.run()
    first = LoraTrainer(settings(builtin_dir, images, tmp_path / "b.safetensors"), tmp_path / "parts", progress=False)
    assert not first.run(budget_s=0.0)  # the budget ends it after one step, checkpointed
    assert first.step == 1
    second = LoraTrainer(settings(builtin_dir, images, tmp_path / "b.safetensors"), tmp_path / "parts", progress=False)
    assert second.step == 1 and second.run()
    a, b = weights(whole), weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith(".up"))  # it trained (up starts at zero)
    same = settings(builtin_dir, images, tmp_path / "elsewhere.safetensors")
    assert same.fingerprint() == whole.settings.fingerprint()  # where the adapter goes does not matter
    changed = LoraTrainSettings(**{**same.__dict__, "rank": 3})
    assert changed.fingerprint() != same.fingerprint()  # a checkpoint of other settings is refused, not resumed


def test_the_command_writes_an_adapter_the_server_loads(builtin_dir, images, tmp_path):
    out = tmp_path / "adapters" / "framed-test.safetensors"
    code = cli_main(["train-lora", "--model", str(builtin_dir), "--images", str(images), "--rank", "2",
                     "--steps", "3", "--lr", "1e-2", "--batch-size", "2", "--out", str(out), "--seed", "0",
                     "--no-progress", "--log-level", "WARNING"])
    assert code == 0
    header = inspect_file(out)
    assert (header.format, header.rank, header.base_model) == ("peft", 2, builtin_dir.name)
    assert any(".resnets." in t.name for t in header.targets)  # --targets all: the convolutions too

    model = load_model("builtin", builtin_dir, lora_library=AdapterLibrary(out.parent))

    def image(scale: float) -> np.ndarray:
        request = resolve(GenerationParams(prompt="a large white square on a red background", seed=1, steps=4,
                                           loras=(("framed-test", scale),)), model)
        return model.pipeline.generate(request).images_uint8()[0]

    base = image(0.0)
    assert not np.array_equal(image(1.0), base)
    assert np.array_equal(image(0.0), base)
