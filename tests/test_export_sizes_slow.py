"""Export sizes on an SD-proportioned UNet (the sd15-half preset, 880 MB in fp32). Slow: run with -m slow."""

from __future__ import annotations

import os

import pytest

from diffusiond.export.calibration import CalibrationSettings
from diffusiond.export.onnx_export import ExportOptions, export_onnx
from diffusiond.models.descriptors import Range, ShapeProfile
from diffusiond.models.synthetic import write_sd_model

FP16_MAX_SIZE_RATIO = 0.55
INT8_MAX_SIZE_RATIO = 0.30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def half_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    os.environ["DIFFUSIOND_CACHE"] = str(root / "cache")
    write_sd_model(root / "sd15-half", "sd15-half")
    return root


def test_fp16_and_int8_unets_are_small_enough(half_model):
    size = Range(128, 128, 256)
    profile = ShapeProfile(images=Range(1, 1, 2), height=size, width=size)
    sizes = {}
    for precision in ("fp32", "fp16", "int8"):
        options = ExportOptions(
            precision=precision, profile=profile, verify=False,
            calibration=CalibrationSettings(max_prompts=1, steps=2, size=128, method="minmax"),
        )
        manifest = export_onnx(half_model / "sd15-half", half_model / precision, options).manifest
        sizes[precision] = manifest.components["unet"].bytes
    assert sizes["fp16"] <= FP16_MAX_SIZE_RATIO * sizes["fp32"]
    assert sizes["int8"] <= INT8_MAX_SIZE_RATIO * sizes["fp32"]
