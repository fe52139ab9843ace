"""ControlNet export: its own ONNX component (descriptors, dynamic shapes, verification), served by ONNX
Runtime like eager PyTorch serves it, and planned into TensorRT engines when asked."""

from __future__ import annotations

import json
import shutil

import pytest
from test_controlnet import make_controlnet, request, scene_image

from diffusiond.errors import FailedPrecondition, NotFound
from diffusiond.eval.compare import psnr
from diffusiond.export.onnx_export import ExportOptions, export_onnx
from diffusiond.export.tensorrt_build import EngineBuildOptions, plan_engines
from diffusiond.models.canny import canny
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    CONTROLNET,
    UNET_CONTROLLED,
    SDDims,
    control_residual_names,
    descriptors_for,
)
from diffusiond.pipeline.request import ControlSpec
from diffusiond.service.models import load_model

FP32_MIN_PSNR_DB = 45.0  # as the ONNX Runtime backend's fp32 parity test
MINIMAL = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def controlnet_dir(builtin_dir, tmp_path_factory):
    return make_controlnet(builtin_dir, tmp_path_factory.mktemp("cn-export") / "edges")


@pytest.fixture(scope="module")
def export(builtin_dir, controlnet_dir, tmp_path_factory):
    options = ExportOptions(components=MINIMAL, step_cache_depth=0, controlnet=str(controlnet_dir),
                            controlnet_name="edges")
    return export_onnx(builtin_dir, tmp_path_factory.mktemp("cn-onnx") / "out", options)


def test_controlnet_is_its_own_verified_component(export, builtin_dir):
    manifest = export.manifest
    assert {CONTROLNET, UNET_CONTROLLED} <= set(manifest.components)
    entry = manifest.components[CONTROLNET]
    dims = SDDims.from_model_dir(builtin_dir)
    names = control_residual_names(dims)
    assert [o["name"] for o in entry.io["outputs"]] == names  # 8 skip residuals and the middle block's
    assert entry.io["dynamic_axes"]["controlnet_cond"] == {"0": "batch", "2": "height", "3": "width"}
    assert [i["name"] for i in manifest.components[UNET_CONTROLLED].io["inputs"]][3:] == names
    assert len(entry.tested) == 2 and all(t["max_abs_error"] < 2e-3 for t in entry.tested)  # ORT vs torch
    assert manifest.options["controlnet"]["name"] == "edges"
    control = json.loads((export.directory / CONTROLNET / "diffusiond_control.json").read_text())
    assert control["name"] == "edges"
    assert set(descriptors_for(export.directory)) >= {CONTROLNET, UNET_CONTROLLED}


def test_onnxruntime_serves_the_exported_controlnet_like_pytorch(export, builtin_dir, controlnet_dir):
    served = load_model("onnx", export.directory, "onnxruntime")
    eager = load_model("builtin", builtin_dir, controlnets={"edges": controlnet_dir})
    try:
        assert list(served.controlnets) == ["edges"]
        control = ControlSpec("edges", canny(scene_image(7, (64, 72))), scale=0.9, guidance_end=0.8)
        req = request(control, steps=4)
        ours = served.pipeline.generate(req).images_uint8()
        reference = eager.pipeline.generate(req).images_uint8()
        plain = eager.pipeline.generate(request(None, steps=4)).images_uint8()
        assert psnr(ours, reference) >= FP32_MIN_PSNR_DB
        assert psnr(ours, plain) < FP32_MIN_PSNR_DB  # the ControlNet acted
        with pytest.raises(FailedPrecondition, match="export onnx --controlnet"):
            served.backend.attach_controlnet("other", controlnet_dir)
    finally:
        served.backend.close()
        eager.backend.close()


def test_tensorrt_plan_builds_the_controlnet_when_asked(export):
    plain = plan_engines(export.directory, EngineBuildOptions())
    assert CONTROLNET not in [e.component for e in plain.engines]
    plan = plan_engines(export.directory, EngineBuildOptions(controlnet=True))
    engines = {e.component: e for e in plan.engines}
    assert {CONTROLNET, UNET_CONTROLLED} <= set(engines)
    profile = engines[CONTROLNET].input_profile
    # Guided calls run two rows per image; the control image is at pixel size, the latents at 1/factor.
    assert profile["controlnet_cond"][2][0] == 2 * plan.profile.images.max
    assert profile["controlnet_cond"][1][2:] == (plan.profile.height.opt, plan.profile.width.opt)
    factor = load_model_config(export.directory).vae_scale_factor
    assert profile["sample"][1][2:] == (plan.profile.height.opt // factor, plan.profile.width.opt // factor)
    assert "mid_block_res_sample" in engines[UNET_CONTROLLED].input_profile


def test_tensorrt_plan_refuses_a_controlnet_the_export_lacks(export, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(export.directory, bare, ignore=shutil.ignore_patterns(CONTROLNET, UNET_CONTROLLED))
    with pytest.raises(NotFound, match="--controlnet"):
        plan_engines(bare, EngineBuildOptions(controlnet=True))


def test_tensorrt_builds_and_serves_the_controlnet(export, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable here (no CUDA GPU): only the plan is tested")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from diffusiond.export.tensorrt_build import build_engines

    build_engines(export.directory, tmp_path / "engines", EngineBuildOptions(controlnet=True))
    served = load_model("trt", tmp_path / "engines", "tensorrt")
    try:
        assert list(served.controlnets) == ["edges"]
    finally:
        served.backend.close()
