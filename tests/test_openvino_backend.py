"""The OpenVINO backend and `diffusiond export openvino`: images like eager's, options that reach OpenVINO,
the model cache, what it refuses. Network-level parity, mixed timesteps and out-of-memory are in
tests/test_backend_conformance.py."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from diffusiond.backends import cpu_features  # noqa: E402
from diffusiond.backends.base import BackendSettings  # noqa: E402
from diffusiond.backends.openvino import (  # noqa: E402
    OpenVinoOptions,
    cache_key,
    expected_output_shape,
    resolve_precision_hint,
    split_rows,
)
from diffusiond.cli import build_parser, main  # noqa: E402
from diffusiond.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from diffusiond.eval.compare import psnr  # noqa: E402
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import UNET, VAE_DECODER, descriptors_for  # noqa: E402
from diffusiond.pipeline.request import GenerationRequest, PreviewSpec  # noqa: E402
from diffusiond.service.models import load_model  # noqa: E402

FP32_MIN_PSNR_DB = 45.0  # the same request through two fp32 runtimes (as for ONNX Runtime)
HAVE_BF16 = cpu_features.has_native_bf16()


def request(**fields) -> GenerationRequest:
    base = dict(
        request_id="openvino", model="builtin", prompt="a large red circle on a blue background, top left",
        negative_prompt="", width=64, height=72, steps=6, guidance_scale=4.0, seed=1234, num_images=2,
        scheduler="dpmpp_2m", preview=PreviewSpec(),
    )
    base.update(fields)
    return GenerationRequest(**base)


@pytest.fixture(scope="module")
def ov_model(onnx_export):
    model = load_model("builtin", onnx_export("fp32"), "openvino")
    yield model
    model.backend.close()


def test_fp32_images_match_eager(pipeline, ov_model, record_property):
    expected = pipeline.generate(request()).images_uint8()
    got = ov_model.pipeline.generate(request()).images_uint8()
    record_property("psnr_db", psnr(got, expected))
    assert got.shape == expected.shape == (2, 72, 64, 3)
    assert psnr(got, expected) >= FP32_MIN_PSNR_DB
    assert ov_model.backend.dtype_name == "fp32" and ov_model.backend.artifact.kind == "ONNX export"


def test_throughput_hint_threads_and_streams_reach_openvino_and_split_the_rows(pipeline, onnx_export, tmp_path):
    options = OpenVinoOptions(performance_hint="throughput", streams=2, cache_dir=str(tmp_path))
    model = load_model("builtin", onnx_export("fp32"), "openvino", BackendSettings(threads=2, options=options))
    try:
        graph = model.backend.graphs[UNET]
        compiled = graph.compiled
        assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
        assert int(compiled.get_property("NUM_STREAMS")) == 2
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        assert len(graph.requests) == int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) >= 2
        # 4 rows (2 images, guided) run as two requests at once, and give what one request gives
        got = model.pipeline.generate(request()).images_uint8()
        assert psnr(got, pipeline.generate(request()).images_uint8()) >= FP32_MIN_PSNR_DB
    finally:
        model.backend.close()


def test_a_unet_taking_one_timestep_per_call_still_gives_each_row_its_own(ov_model, onnx_export, builtin_dir, tmp_path):
    """An export whose UNet takes a fixed [1] timestep (as some Optimum exports declare it), run with the
    throughput hint: rows grouped by timestep, each group split across requests, put back in order."""
    import onnx

    out = shutil.copytree(onnx_export("fp32"), tmp_path / "m")
    path = out / "unet" / "model.onnx"
    model = onnx.load(str(path))
    dims = next(i for i in model.graph.input if i.name == "timestep").type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_value = 1
    onnx.save(model, str(path))
    options = OpenVinoOptions(performance_hint="throughput", cache=False)
    per_call = load_model("builtin", out, "openvino", BackendSettings(options=options)).backend
    try:
        assert per_call.graphs[UNET].inputs["timestep"].shape == (1,) and "timestep" not in per_call.graphs[UNET].batched
        feeds = descriptors_for(builtin_dir)[UNET].sample_inputs(5, 64, 64)
        sample, context = torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["encoder_hidden_states"])
        t = torch.tensor([999.0, 10.0, 999.0, 500.0, 10.0])
        expected = ov_model.backend.unet(sample, t, context)
        assert (per_call.unet(sample, t, context) - expected).abs().max() <= 1e-5 * expected.abs().max()
    finally:
        per_call.close()


def test_split_rows_cuts_batched_inputs_only():
    feeds = {"sample": torch.zeros(5, 4, 8, 8), "timestep": torch.zeros(1)}
    parts = split_rows(feeds, {"sample"}, 2)
    assert [p["sample"].shape[0] for p in parts] == [3, 2]
    assert all(p["timestep"].shape == (1,) for p in parts)
    assert len(split_rows(feeds, {"sample"}, 1)) == 1
    assert len(split_rows({"sample": torch.zeros(1, 4, 8, 8)}, {"sample"}, 4)) == 1


def test_expected_output_shapes_come_from_the_descriptors(builtin_dir):
    descriptors = descriptors_for(builtin_dir)
    unet = {"sample": torch.zeros(3, 4, 9, 8), "timestep": torch.zeros(3), "encoder_hidden_states": torch.zeros(3, 77, 64)}
    assert expected_output_shape(descriptors[UNET], "out_sample", unet) == (3, 4, 9, 8)
    factor = load_model_config(builtin_dir).vae_scale_factor
    assert expected_output_shape(descriptors[VAE_DECODER], "sample",
                                 {"latent_sample": torch.zeros(2, 4, 9, 8)}) == (2, 3, 9 * factor, 8 * factor)
    assert expected_output_shape(descriptors[UNET], "another_name", unet) is None
    for one_per_call in (torch.zeros(1), torch.tensor(5.0)):  # the rows are the sample's
        assert expected_output_shape(descriptors[UNET], "out_sample", {**unet, "timestep": one_per_call}) == (3, 4, 9, 8)


# -- precision ------------------------------------------------------------------------------------


def test_precision_follows_dtype_unless_the_hint_says_and_contradictions_are_refused():
    assert resolve_precision_hint(OpenVinoOptions(), BackendSettings()) == "fp32"
    with pytest.raises(InvalidArgument, match="'fp16' is not one the openvino backend computes in"):
        resolve_precision_hint(OpenVinoOptions(), BackendSettings(dtype="fp16"))
    if HAVE_BF16:
        assert resolve_precision_hint(OpenVinoOptions(), BackendSettings(dtype="bf16")) == "bf16"
        assert resolve_precision_hint(OpenVinoOptions(precision_hint="bf16"), BackendSettings()) == "bf16"
    with pytest.raises(InvalidArgument, match="--dtype bf16 contradicts --ov-precision-hint fp32"):
        resolve_precision_hint(OpenVinoOptions(precision_hint="fp32"), BackendSettings(dtype="bf16"))


def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_native_bf16", lambda: False)
    with pytest.raises(FailedPrecondition, match="neither AVX512-BF16 nor AMX"):
        resolve_precision_hint(OpenVinoOptions(precision_hint="bf16"), BackendSettings())


def test_the_model_cache_is_reused_and_kept_apart_per_precision(onnx_export, tmp_path):
    """OpenVINO's own cache key leaves out the precision hint: a model cached at fp32 came back as NaN for bf16."""
    tokens = load_model_config(onnx_export("fp32")).text_max_length
    ids = torch.randint(0, 300, (2, tokens), generator=torch.Generator().manual_seed(0))

    def load(hint: str):
        options = OpenVinoOptions(precision_hint=hint, cache_dir=str(tmp_path))
        return load_model("builtin", onnx_export("fp32"), "openvino", BackendSettings(options=options)).backend

    first = load("fp32")
    expected = first.text_encoder(ids)
    assert not first.graphs[UNET].compiled.get_property("LOADED_FROM_CACHE")
    second = load("fp32")
    assert second.graphs[UNET].compiled.get_property("LOADED_FROM_CACHE")
    assert torch.equal(second.text_encoder(ids), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache_key("CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})]
    if HAVE_BF16:
        bf16 = load("bf16")
        assert not bf16.graphs[UNET].compiled.get_property("LOADED_FROM_CACHE")
        got = bf16.text_encoder(ids)
        assert torch.isfinite(got).all()
        assert float((got - expected).abs().max() / expected.abs().max()) < 5e-2
        assert len(list(tmp_path.iterdir())) == 2


# -- what it serves and what it refuses -----------------------------------------------------------


def test_refuses_a_diffusers_directory_naming_the_export_command(builtin_dir):
    with pytest.raises(FailedPrecondition, match="diffusiond export openvino"):
        load_model("builtin", builtin_dir, "openvino")


def test_refuses_another_precision_and_a_cuda_device(onnx_export):
    with pytest.raises(FailedPrecondition, match="holds fp32 networks, but precision int8 was asked for"):
        load_model("builtin", onnx_export("fp32"), "openvino", BackendSettings(expect_precision="int8"))
    with pytest.raises(InvalidArgument, match="--ov-device"):
        load_model("builtin", onnx_export("fp32"), "openvino", BackendSettings(device="cuda"))


def test_serves_an_ir_without_a_manifest_with_a_warning_and_judges_its_precision(onnx_export, tmp_path, caplog):
    import openvino as ov

    from diffusiond.backends.openvino import ir_precision

    source = onnx_export("fp32")
    assert ir_precision(ov, ov.Core().read_model(str(source / "text_encoder" / "model.onnx"))) == "fp32"
    out = tmp_path / "optimum-intel-like"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.onnx", "manifest.json"))
    for component in ("text_encoder", "unet", "vae_decoder"):  # weights compressed to fp16, as Optimum-Intel does
        ov.save_model(ov.convert_model(str(source / component / "model.onnx")),
                      str(out / component / "openvino_model.xml"), compress_to_fp16=True)
    with caplog.at_level(logging.WARNING, logger="diffusiond.backends.openvino"):
        model = load_model("builtin", out, "openvino", BackendSettings(options=OpenVinoOptions(cache=False)))
    try:
        assert "has no manifest.json" in caplog.text
        assert model.backend.artifact.kind == "OpenVINO IR export" and model.backend.dtype_name == "fp16"
        assert model.pipeline.generate(request(steps=2)).images.shape == (2, 72, 64, 3)
    finally:
        model.backend.close()


def test_serve_offers_the_backend_with_its_flags():
    args = build_parser("serve").parse_args([
        "serve", "--backend", "openvino", "--ov-precision-hint", "bf16", "--ov-performance-hint", "throughput",
        "--ov-streams", "3", "--ov-no-cache",
    ])
    from diffusiond.cli import backend_settings_from_args

    settings = backend_settings_from_args(args)
    assert settings.options == OpenVinoOptions(precision_hint="bf16", performance_hint="throughput", streams=3,
                                               cache=False)


# -- export openvino --------------------------------------------------------------------------------


def test_export_converts_an_onnx_export_verifies_it_and_is_reused(builtin_dir, onnx_export, pipeline, tmp_path, capsys):
    out = tmp_path / "ir"
    argv = ["export", "openvino", "--model", str(builtin_dir), "--onnx", str(onnx_export("fp32")), "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "diffusiond-openvino" and manifest["precision"] == "fp32"
    for name, entry in manifest["components"].items():
        assert entry["files"] == [f"{name}/openvino_model.xml", f"{name}/openvino_model.bin"]
        assert entry["tested"] and all(t["max_abs_error"] < 1e-3 for t in entry["tested"])
    assert not (out / "unet" / "model.onnx").exists() and (out / "tokenizer").is_dir()
    assert "written (OpenVINO IR, fp32" in capsys.readouterr().out
    assert main(argv) == 0
    assert "up to date, reused" in capsys.readouterr().out

    model = load_model("builtin", out, "openvino", BackendSettings(expect_precision="fp32"))
    try:
        assert model.backend.artifact.kind == "OpenVINO IR export"
        got = model.pipeline.generate(request()).images_uint8()
        assert psnr(got, pipeline.generate(request()).images_uint8()) >= FP32_MIN_PSNR_DB
    finally:
        model.backend.close()


def test_export_refuses_an_onnx_export_it_cannot_convert(builtin_dir, onnx_export, tmp_path, caplog):
    onnx = shutil.copytree(onnx_export("fp32"), tmp_path / "onnx")
    manifest = json.loads((onnx / "manifest.json").read_text())
    manifest.update(precision="int8", source={**manifest["source"], "sha256": "0" * 64})
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    argv = ["export", "openvino", "--model", str(builtin_dir), "--out", str(tmp_path / "ir"), "--onnx", str(onnx)]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "holds int8 networks, and OpenVINO IR is converted from fp32 ones" in caplog.text
    assert "exported from another model (source sha256 0000000000000000" in caplog.text
    assert not (tmp_path / "ir").exists()


@pytest.mark.slow
def test_int8_export_quantizes_the_unet_with_nncf(openvino_export, pipeline):
    """Minutes: the calibration run and NNCF. Network parity is in the conformance suite (openvino-int8-nncf)."""
    out = openvino_export("int8")
    manifest = json.loads((out / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert unet["precision"] == "int8" and unet["notes"]["int8"]["fake_quantize_nodes"] > 0
    assert unet["notes"]["int8"]["operations_kept_fp32"] > 0
    assert manifest["calibration"]["samples"] > 0
    assert all(manifest["components"][c]["precision"] == "fp32" for c in ("text_encoder", "vae_decoder"))
    assert unet["bytes"] < 0.6 * unet["notes"]["onnx_bytes"]
    model = load_model("builtin", out, "openvino", BackendSettings(expect_precision="int8"))
    try:
        images = model.pipeline.generate(request()).images_uint8()
        assert images.shape == (2, 72, 64, 3) and np.isfinite(images).all()
    finally:
        model.backend.close()
