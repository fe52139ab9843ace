"""TensorRT: engine planning from real ONNX exports, manifests and machine checks, profile checks,
and clear refusals where TensorRT is not installed. Building and running engines needs TensorRT
and a CUDA GPU; those tests skip elsewhere (this repository's CI has neither)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from diffusiond.backends.base import BackendSettings
from diffusiond.backends.graph import GraphInput, TimestepForm, timestep_form
from diffusiond.backends.tensorrt import check_in_profile, is_trt_out_of_memory, profile_shape, split_rows
from diffusiond.cli import main
from diffusiond.errors import FailedPrecondition, InvalidArgument, MissingDependency, NotFound
from diffusiond.export.tensorrt_build import EngineBuildOptions, build_engines, int8_problems, plan_engines
from diffusiond.models.descriptors import COMPONENTS, UNET_SHALLOW, Range, ShapeProfile
from diffusiond.models.tensorrt_artifact import (
    EngineManifest,
    MachineInfo,
    compatibility_problems,
    import_tensorrt,
    missing_engines,
)
from diffusiond.service.models import load_model

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT and a CUDA GPU are not available")

NOT_INSTALLED = "needs the 'tensorrt' package, which is not installed (pip install 'diffusiond[tensorrt]')"
H100 = MachineInfo("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail as it does where the package is absent (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def engine_manifest(machine: MachineInfo = H100, components=("text_encoder", "unet", "vae_decoder")) -> EngineManifest:
    return EngineManifest(
        precision="fp16",
        machine=asdict(machine),
        source={"path": "/x", "sha256": "ab" * 32, "onnx_precision": "fp16", "model_sha256": "cd" * 32},
        components={c: {"file": f"{c}/model.plan", "bytes": 1, "precision": "fp16"} for c in components},
        profile=ShapeProfile().to_json(),
        options={},
        options_key="k",
        versions={},
    )


# -- planning from real exports -------------------------------------------------------------------


def test_plan_follows_the_fp16_export(onnx_export):
    onnx_dir = onnx_export("fp16")
    plan = plan_engines(onnx_dir, EngineBuildOptions())
    assert plan.precision == "fp16"
    assert [e.component for e in plan.engines] == [c for c in COMPONENTS if c != UNET_SHALLOW]  # no step caching
    by_name = {e.component: e for e in plan.engines}
    # The export keeps the VAE in fp32 (force_upcast); strongly typed engines keep what it chose.
    onnx_manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert {n: e.precision for n, e in by_name.items()} == {
        n: c["precision"] for n, c in onnx_manifest["components"].items() if n != UNET_SHALLOW
    }
    assert by_name["unet"].precision == "fp16" and by_name["vae_decoder"].precision == "fp32"
    assert by_name["unet"].onnx_file == onnx_dir / "unet" / "model.onnx"
    # The export's own profile: 1-4 images, 64-128 px; the guided UNet sees two rows per image.
    assert plan.profile == ShapeProfile.from_json(onnx_manifest["profile"])
    assert by_name["unet"].input_profile["sample"] == ((1, 4, 16, 16), (2, 4, 16, 16), (8, 4, 32, 32))


@pytest.mark.parametrize(
    "precision, cleared, unet_precision",
    [("fp32", ("TF32",), "fp32"), ("fp16", (), "fp16"), ("int8", (), "int8")],
)
def test_flags_per_precision(onnx_export, precision, cleared, unet_precision):
    plan = plan_engines(onnx_export(precision), EngineBuildOptions(precision=precision))
    assert plan.precision == precision
    for engine in plan.engines:
        # Precision lives in the graph's types: no FP16/INT8 builder flags (removed in TensorRT 11).
        assert engine.network_flags == ("STRONGLY_TYPED",)
        assert engine.cleared_flags == cleared
        assert set(engine.to_json()) == {"precision", "network_flags", "cleared_flags", "profile"}
    assert next(e for e in plan.engines if e.component == "unet").precision == unet_precision


def test_int8_engines_from_a_non_int8_export_are_refused(onnx_export):
    with pytest.raises(FailedPrecondition, match=r"int8 engines are built from an INT8 \(QDQ\) ONNX export, "
                       r"but .*fp16 is a fp16 export; export with `diffusiond export onnx --precision int8`"):
        plan_engines(onnx_export("fp16"), EngineBuildOptions(precision="int8"))
    with pytest.raises(FailedPrecondition, match=r"fp16 engines are built from a fp16 ONNX export .* "
                       r"but .*fp32 is a fp32 export; export with `diffusiond export onnx --precision fp16`"):
        plan_engines(onnx_export("fp32"), EngineBuildOptions(precision="fp16"))


def test_an_int8_export_tensorrt_cannot_take_is_refused(onnx_export, tmp_path):
    out = shutil.copytree(onnx_export("int8"), tmp_path / "u8")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"]["int8"].update(activation_type="uint8", symmetric_activations=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FailedPrecondition, match="INT8 export TensorRT cannot build: its activation type is uint8.*"
                       "asymmetric"):
        plan_engines(out, EngineBuildOptions())
    assert int8_problems({"format": "QOperator"}) == [
        "its format is QOperator, and TensorRT takes QDQ (QuantizeLinear/DequantizeLinear)"
    ]
    assert int8_problems(manifest["options"]["int8"] | {"activation_type": "int8", "symmetric_activations": True}) == []


def test_shape_profile_gives_each_input_its_min_opt_max(onnx_export, builtin_dir):
    text = json.loads((builtin_dir / "text_encoder" / "config.json").read_text())
    width, tokens = text["hidden_size"], text["max_position_embeddings"]
    profile = ShapeProfile(images=Range(1, 2, 3), height=Range(64, 128, 256), width=Range(32, 64, 128))
    plan = plan_engines(onnx_export("fp16"), EngineBuildOptions(profile=profile))
    shapes = {e.component: e.input_profile for e in plan.engines}
    assert plan.profile == profile
    assert shapes["unet"] == {
        "sample": ((1, 4, 16, 8), (4, 4, 32, 16), (6, 4, 64, 32)),  # guided: two rows per image at opt and max
        "timestep": ((1,), (4,), (6,)),
        "encoder_hidden_states": ((1, tokens, width), (4, tokens, width), (6, tokens, width)),
    }
    assert shapes["text_encoder"] == {"input_ids": ((1, tokens), (2, tokens), (3, tokens))}
    assert shapes["vae_decoder"] == {"latent_sample": ((1, 4, 16, 8), (2, 4, 32, 16), (3, 4, 64, 32))}
    assert shapes["vae_encoder"] == {"sample": ((1, 3, 64, 32), (2, 3, 128, 64), (3, 3, 256, 128))}
    unet_json = next(e for e in plan.engines if e.component == "unet").to_json()["profile"]
    assert unet_json["timestep"] == {"min": [1], "opt": [4], "max": [6]}


def test_the_vae_encoder_is_built_when_asked(onnx_export, tmp_path):
    """auto: when the export has it; build: required; skip: never (engines for text to image only)."""
    def components(onnx_dir, choice):
        return [e.component for e in plan_engines(onnx_dir, EngineBuildOptions(vae_encoder=choice)).engines]

    full = onnx_export("fp32")
    built = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]  # no step-caching or ControlNet engines by default
    assert components(full, "auto") == components(full, "build") == built
    assert "vae_encoder" not in components(full, "skip")
    without = shutil.copytree(full, tmp_path / "no-encoder")
    shutil.rmtree(without / "vae_encoder")
    assert "vae_encoder" not in components(without, "auto")
    with pytest.raises(NotFound, match="has no vae_encoder/model.onnx, which image inputs need"):
        components(without, "build")
    with pytest.raises(InvalidArgument, match="vae_encoder: 'yes' is not one of auto, build, skip"):
        EngineBuildOptions(vae_encoder="yes")


def test_profile_sizes_must_fit_the_vae_factor(onnx_export):
    profile = ShapeProfile(height=Range(62, 64, 128), width=Range(64, 64, 128))
    with pytest.raises(InvalidArgument, match="not a multiple of the VAE factor 4"):
        plan_engines(onnx_export("fp16"), EngineBuildOptions(profile=profile))


def test_plan_refuses_what_is_not_an_onnx_export(builtin_dir, tmp_path):
    with pytest.raises(NotFound, match=r"holds no unet/model.onnx: not an ONNX export \(a diffusers-format model"):
        plan_engines(builtin_dir, EngineBuildOptions())
    with pytest.raises(InvalidArgument, match="precision: 'bf16' is not one of fp32, fp16, int8"):
        EngineBuildOptions(precision="bf16")
    with pytest.raises(InvalidArgument, match="optimization_level: must be between 0 and 5, got 7"):
        EngineBuildOptions(optimization_level=7)
    with pytest.raises(InvalidArgument, match="missing required: unet"):
        EngineBuildOptions(components=("text_encoder", "vae_decoder"))


# -- manifests and machines -------------------------------------------------------------------------


def test_compatibility_names_each_mismatch():
    manifest = engine_manifest()
    assert compatibility_problems(manifest, H100) == ([], [])

    problems, _ = compatibility_problems(manifest, MachineInfo(H100.gpu_name, "9.0", "10.9.0.34"))
    assert problems == [
        "built with TensorRT 10.13.0.35, this machine has 10.9.0.34 (engines are tied to the TensorRT version that built them)"
    ]
    problems, _ = compatibility_problems(manifest, MachineInfo("NVIDIA A100-SXM4-80GB", "8.0", H100.tensorrt_version))
    assert problems == ["built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.0 (NVIDIA A100-SXM4-80GB)"]

    problems, notes = compatibility_problems(manifest, MachineInfo("NVIDIA H200", "9.0", H100.tensorrt_version))
    assert problems == []  # same architecture: runs, but was tuned on the other GPU
    assert notes and "built on a NVIDIA H100 80GB HBM3, running on a NVIDIA H200" in notes[0]

    problems, _ = compatibility_problems(manifest, MachineInfo("NVIDIA L4", "8.9", "10.9.0.34"))
    assert len(problems) == 2


def test_missing_engines(tmp_path):
    manifest = engine_manifest(components=("text_encoder", "unet"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.plan").write_bytes(b"x")
    assert missing_engines(tmp_path, manifest) == [
        "no vae_decoder engine in the manifest",
        "text_encoder: text_encoder/model.plan is missing",
    ]


def test_manifest_round_trip_and_refusals(onnx_export, tmp_path):
    manifest = engine_manifest()
    manifest.write(tmp_path)
    assert EngineManifest.read(tmp_path) == manifest
    assert EngineManifest.read(tmp_path).model_sha256 == "cd" * 32
    with pytest.raises(FailedPrecondition, match="has no manifest.json: not a TensorRT artifact"):
        EngineManifest.read(tmp_path / "nothing")
    with pytest.raises(FailedPrecondition, match="not a TensorRT manifest this version reads: format is 'diffusiond-onnx'"):
        EngineManifest.read(onnx_export("fp16"))


# -- run-time checks --------------------------------------------------------------------------------


def test_check_in_profile_names_the_input_and_the_range():
    check_in_profile("unet", "sample", (2, 4, 8, 8), (1, 4, 8, 8), (8, 4, 16, 16))
    with pytest.raises(FailedPrecondition, match=r"unet: input sample of shape \[2, 4, 32, 32\] is outside the "
                       r"TensorRT engine's profile \(from \[1, 4, 8, 8\] to \[8, 4, 16, 16\]\); rebuild"):
        check_in_profile("unet", "sample", (2, 4, 32, 32), (1, 4, 8, 8), (8, 4, 16, 16))
    with pytest.raises(FailedPrecondition, match="input timestep of shape"):
        check_in_profile("unet", "timestep", (), (1,), (8,))


def test_calls_larger_than_the_profile_run_in_pieces():
    feeds = {"sample": torch.arange(10).reshape(5, 2), "timestep": torch.arange(5.0), "fixed": torch.zeros(1)}
    pieces = split_rows(feeds, {"sample", "timestep"}, limit=2)
    assert [p["sample"].shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["timestep"] for p in pieces]), feeds["timestep"])
    assert all(p["fixed"] is feeds["fixed"] for p in pieces)
    assert split_rows(feeds, {"sample", "timestep"}, limit=8) == [feeds]


def test_the_timestep_form_follows_the_engines_profile():
    def form(low, high):
        return timestep_form(GraphInput("timestep", torch.float32, profile_shape(low, high)))

    assert form((1,), (8,)) is TimestepForm.ROWS  # one per row: mixed timesteps go in one call
    assert form((), ()) is TimestepForm.SCALAR  # one per call: rows are grouped by timestep
    assert form((1,), (1,)) is TimestepForm.SINGLE
    assert profile_shape((1, 4, 8, 8), (8, 4, 16, 16)) == (None, 4, None, None)


def test_tensorrt_out_of_memory_is_recognised_from_its_log():
    assert is_trt_out_of_memory(RuntimeError(
        "TensorRT failed to run the unet engine: [defaultAllocator.cpp::allocate::31] Error Code 1: "
        "Cuda Runtime (out of memory)"))
    assert is_trt_out_of_memory(RuntimeError("TensorRT failed to run the unet engine: Error Code 2: OutOfMemory"))
    assert not is_trt_out_of_memory(RuntimeError("TensorRT failed to run the unet engine: see its log above"))


# -- without TensorRT: clear refusals ---------------------------------------------------------------


def test_missing_tensorrt_is_a_clear_error(no_tensorrt):
    with pytest.raises(MissingDependency, match=r"TensorRT engines .* needs the 'tensorrt' package, which is not installed"):
        import_tensorrt()


def test_export_tensorrt_without_tensorrt_exits_2_with_the_reason(onnx_export, tmp_path, no_tensorrt, caplog, capsys):
    out = tmp_path / "engines"
    with caplog.at_level(logging.ERROR):
        code = main(["export", "tensorrt", "--onnx", str(onnx_export("fp16")), "--out", str(out)])
    assert code == 2
    assert "TensorRT build failed" in caplog.text and NOT_INSTALLED in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err
    assert not out.exists()


def test_export_tensorrt_refuses_a_precision_the_export_lacks(onnx_export, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["export", "tensorrt", "--onnx", str(onnx_export("fp16")), "--out", str(tmp_path / "e"),
                     "--precision", "int8"])
    assert code == 2 and "int8 engines are built from an INT8 (QDQ) ONNX export" in caplog.text


def test_build_refuses_to_replace_what_is_not_engines(onnx_export, tmp_path):
    onnx_dir = onnx_export("fp16")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="non-empty directory that holds no TensorRT engines"):
        build_engines(onnx_dir, keep, EngineBuildOptions())
    assert (keep / "notes.txt").read_text() == "mine"
    with pytest.raises(InvalidArgument, match="is the ONNX export itself"):
        build_engines(onnx_dir, onnx_dir, EngineBuildOptions())


def test_serve_with_the_tensorrt_backend_without_tensorrt_exits_2(onnx_export, no_tensorrt, caplog, capsys):
    with caplog.at_level(logging.ERROR):
        code = main(["serve", "--port", "0", "--backend", "tensorrt", "--model", str(onnx_export("fp16")),
                     "--no-warmup"])
    assert code == 2
    assert "cannot serve" in caplog.text and NOT_INSTALLED in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err


# -- with TensorRT and a GPU -------------------------------------------------------------------------

# Same seed and request, fp16 engines vs the eager fp32 pipeline on the CPU (8-bit images, all pixels).
TRT_FP16_MIN_PSNR_DB = 30.0


@pytest.fixture(scope="module")
def trt_dir(onnx_export, tmp_path_factory) -> Path:
    if not HAVE_TENSORRT:
        pytest.skip("TensorRT and a CUDA GPU are not available")
    out = tmp_path_factory.mktemp("trt") / "fp16"
    build_engines(onnx_export("fp16"), out, EngineBuildOptions(workspace_gib=1.0, optimization_level=2))
    return out


@needs_tensorrt
def test_engines_are_self_describing_and_reused(trt_dir, onnx_export):
    manifest = EngineManifest.read(trt_dir)
    assert manifest.format == "diffusiond-tensorrt" and manifest.precision == "fp16"
    assert manifest.machine == asdict(MachineInfo.current())
    assert not missing_engines(trt_dir, manifest)
    again, reused = build_engines(onnx_export("fp16"), trt_dir, EngineBuildOptions(workspace_gib=1.0, optimization_level=2))
    assert reused and again.options_key == manifest.options_key


@needs_tensorrt
def test_images_match_eager(trt_dir, pipeline):
    import numpy as np
    from test_onnxruntime_backend import psnr, request, run

    model = load_model("builtin", trt_dir, "tensorrt", BackendSettings(device="cuda"))
    try:
        assert model.backend.dtype_name == "fp16" and model.backend.device.type == "cuda"
        req = request("ddim", num_images=2, steps=8)
        expected, _ = run(pipeline, req)
        got, _ = run(model.pipeline, req)
        assert got.shape == expected.shape and np.isfinite(got).all()
        assert psnr(got, expected) >= TRT_FP16_MIN_PSNR_DB
        with pytest.raises(FailedPrecondition, match="outside the TensorRT engine's profile"):
            run(model.pipeline, request("ddim", width=256, height=256, steps=2))
    finally:
        model.backend.close()


@needs_tensorrt
def test_engines_from_another_tensorrt_version_are_refused(trt_dir, tmp_path):
    out = shutil.copytree(trt_dir, tmp_path / "old")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["machine"]["tensorrt_version"] = "9.0.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FailedPrecondition, match="built with TensorRT 9.0.0, this machine has"):
        load_model("builtin", out, "tensorrt", BackendSettings(device="cuda"))
