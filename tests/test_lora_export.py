"""LoRA on exported backends: ``export onnx --lora`` fuses adapters into the UNet, the manifest records them,
and ONNX Runtime serves exactly that set (others are FAILED_PRECONDITION naming what the export holds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_lora_serving import random_adapter

from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.cli import main as cli_main
from diffusiond.errors import AdapterMismatch
from diffusiond.server.codec import model_info
from diffusiond.server.status import status_for
from diffusiond.service.adapters import AdapterLibrary
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve

PROMPT = "a small green triangle on a purple background"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, builtin_dir) -> Path:
    from diffusers import UNet2DConditionModel

    directory = tmp_path_factory.mktemp("export-loras")
    shapes = LoraPatcher(UNet2DConditionModel.from_pretrained(builtin_dir / "unet")).weight_shapes()
    random_adapter(directory / "alpha.safetensors", shapes, 1)
    random_adapter(directory / "beta.safetensors", shapes, 2)
    return directory


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, builtin_dir, lora_dir) -> Path:
    out = tmp_path_factory.mktemp("onnx-lora") / "builtin-alpha"
    code = cli_main(["export", "onnx", "--model", str(builtin_dir), "--out", str(out), "--lora-dir", str(lora_dir),
                     "--lora", "alpha:0.8", "--step-cache-depth", "0", "--no-verify", "--log-level", "WARNING"])
    assert code == 0
    return out


def test_the_manifest_records_the_fused_adapters(export_dir, lora_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    (entry,) = manifest["adapters"]
    assert (entry["name"], entry["scale"]) == ("alpha", 0.8)
    assert entry["file"] == str((lora_dir / "alpha.safetensors").resolve()) and len(entry["sha256"]) == 64
    assert manifest["options"]["loras"] == manifest["adapters"]


def test_onnxruntime_serves_the_fused_set_only(export_dir, builtin_dir, lora_dir):
    exported = load_model("builtin-alpha", export_dir, backend_name="onnxruntime")
    info = model_info(exported, True)
    assert [(a.name, round(a.scale, 6)) for a in info.fused_adapters] == [("alpha", 0.8)]

    eager = load_model("builtin", builtin_dir, lora_library=AdapterLibrary(lora_dir))

    def image(model, loras):
        request = resolve(GenerationParams(prompt=PROMPT, seed=3, steps=8, loras=loras), model)
        return model.pipeline.generate(request).images_uint8()[0].astype(int)

    fused = image(exported, (("alpha", np.float32(0.8).item()),))  # the scale as it arrives over the wire
    assert np.array_equal(image(exported, ()), fused)  # no adapters named: the export's own weights
    applied = image(eager, (("alpha", 0.8),))
    base = image(eager, ())
    assert np.abs(fused - applied).max() <= 6  # ONNX Runtime vs PyTorch rounding
    assert np.abs(fused - base).mean() > 5 * np.abs(fused - applied).mean()

    for loras in ((("beta", 1.0),), (("alpha", 0.5),), (("alpha", 0.8), ("beta", 0.3))):
        with pytest.raises(AdapterMismatch) as info_:
            resolve(GenerationParams(prompt=PROMPT, loras=loras), exported)
        assert "alpha:0.8 fused" in str(info_.value) and "onnxruntime" in str(info_.value)
        assert status_for(info_.value) == grpc.StatusCode.FAILED_PRECONDITION


def test_an_export_without_adapters_refuses_them(export_dir, tmp_path):
    plain = tmp_path / "plain"  # the same files with a manifest that lists no adapters
    shutil.copytree(export_dir, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["adapters"] = []
    (plain / "manifest.json").write_text(json.dumps(manifest))
    exported = load_model("plain", plain, backend_name="onnxruntime")
    with pytest.raises(AdapterMismatch, match="no adapters fused.*cannot apply alpha:1"):
        resolve(GenerationParams(prompt=PROMPT, loras=(("alpha", 1.0),)), exported)
    resolve(GenerationParams(prompt=PROMPT, loras=(("alpha", 0.0),)), exported)  # scale 0: nothing to apply


def test_export_refuses_an_adapter_it_cannot_find(tmp_path, builtin_dir, lora_dir, capsys):
    code = cli_main(["export", "onnx", "--model", str(builtin_dir), "--out", str(tmp_path / "x"),
                     "--lora-dir", str(lora_dir), "--lora", "nope:1"])
    assert code == 2


def test_openvino_carries_the_adapters_of_the_onnx_export_it_converts(export_dir, builtin_dir, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "ov"
    assert cli_main(["export", "openvino", "--model", str(builtin_dir), "--onnx", str(export_dir), "--out", str(out),
                     "--step-cache-depth", "0", "--no-verify", "--log-level", "WARNING"]) == 0
    assert [a["name"] for a in json.loads((out / "manifest.json").read_text())["adapters"]] == ["alpha"]
    model = load_model("ov", out, backend_name="openvino")
    resolve(GenerationParams(prompt=PROMPT, loras=(("alpha", 0.8),)), model)
    with pytest.raises(AdapterMismatch, match="openvino backend with alpha:0.8 fused"):
        resolve(GenerationParams(prompt=PROMPT, loras=(("alpha", 1.0),)), model)
