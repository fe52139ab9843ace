"""`diffusiond export onnx`: layout, manifest, dynamic shapes, idempotence, refusals."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffusiond.cli import main
from diffusiond.errors import FailedPrecondition
from diffusiond.export.onnx_export import ExportOptions, export_onnx
from diffusiond.export.torch_modules import load_torch_network
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import COMPONENTS, descriptors_for

# fp32 ONNX Runtime vs PyTorch on the same inputs: float rounding only.
FP32_ATOL = 1e-4


def test_optimum_layout(onnx_export, builtin_dir):
    out = onnx_export("fp32")
    for name in COMPONENTS:
        assert (out / name / "model.onnx").is_file()
        assert (out / name / "config.json").is_file()
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "model_index.json").is_file()
    config = load_model_config(out)  # the same reader serves diffusers and ONNX layouts
    assert (config.latent_channels, config.vae_scale_factor, config.default_size) == (4, 4, 64)
    assert (out / "latent_rgb.json").read_text() == (builtin_dir / "latent_rgb.json").read_text()  # previews


def test_manifest_describes_the_artifact(onnx_export, builtin_dir):
    manifest = json.loads((onnx_export("fp32") / "manifest.json").read_text())
    assert manifest["format"] == "diffusiond-onnx" and manifest["precision"] == "fp32"
    assert manifest["source"]["path"] == str(builtin_dir.resolve())
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["opset"] == 17
    assert set(manifest["components"]) == set(COMPONENTS)
    for key in ("torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        assert manifest["versions"][key] != "not installed"
    unet = manifest["components"]["unet"]
    assert unet["files"] == ["unet/model.onnx"]
    assert unet["io"]["dynamic_axes"]["sample"] == {"0": "batch", "2": "latent_height", "3": "latent_width"}
    assert unet["io"]["profile"]["sample"] == {"min": [1, 4, 16, 16], "opt": [2, 4, 16, 16], "max": [8, 4, 32, 32]}
    tested = [(t["batch"], t["height"], t["width"]) for t in unet["tested"]]
    assert tested == [(1, 64, 64), (2, 68, 72)]  # the profile's min, and latents one and two steps off it
    assert all(t["max_abs_error"] < FP32_ATOL for t in unet["tested"])
    # The VAE encoder, which image inputs need, is verified like every other network: both sizes and batches.
    for name in COMPONENTS:
        tested = manifest["components"][name]["tested"]
        assert [(t["batch"], t["height"], t["width"]) for t in tested] == [(1, 64, 64), (2, 68, 72)], name
        assert all(t["max_abs_error"] < FP32_ATOL * max(1.0, t["output_max_abs"]) for t in tested), name
    assert manifest["components"]["vae_encoder"]["io"]["outputs"][0]["name"] == "latent_parameters"
    assert manifest["calibration"] is None
    # The export serves with the source's own sampling defaults and scheduler.
    exported, source = load_model_config(onnx_export("fp32")), load_model_config(builtin_dir)
    assert exported.sampling_defaults == source.sampling_defaults
    assert exported.scheduler_config == source.scheduler_config


def test_one_unet_serves_several_batch_sizes_and_sizes(onnx_export, builtin_dir):
    """Dynamic axes: batch 1 and 3, 64x64 and 72x96 (latents 18x24, not multiples of the UNet's 4)."""
    descriptor = descriptors_for(builtin_dir)["unet"]
    session = ort.InferenceSession(str(onnx_export("fp32") / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    module = load_torch_network(builtin_dir, "unet")
    for batch in (1, 3):
        for height, width in ((64, 64), (72, 96)):
            feeds = descriptor.sample_inputs(batch, height, width, seed=batch + height)
            (got,) = session.run(["out_sample"], feeds)  # the step-caching deep features are a second output
            with torch.inference_mode():
                expected = module(*(torch.from_numpy(feeds[n]) for n in descriptor.input_names)).numpy()
            assert got.shape == (batch, 4, height // 4, width // 4)
            assert np.abs(got - expected).max() < FP32_ATOL


def test_up_to_date_export_is_reused_and_force_rebuilds(onnx_export, builtin_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(onnx_export("fp32"), out)
    before = (out / "unet" / "model.onnx").stat().st_mtime_ns
    again = export_onnx(builtin_dir, out, ExportOptions(precision="fp32"))
    assert again.reused and (out / "unet" / "model.onnx").stat().st_mtime_ns == before
    rebuilt = export_onnx(builtin_dir, out, ExportOptions(precision="fp32", force=True, verify=False))
    assert not rebuilt.reused
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns != before
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == again.manifest.source_sha256
    assert not list(tmp_path.glob(".copy.*"))  # no staging or old directories left behind


def test_cli_reports_an_up_to_date_export(onnx_export, builtin_dir, capsys, caplog):
    out = onnx_export("fp32")
    with caplog.at_level(logging.INFO):
        assert main(["export", "onnx", "--model", str(builtin_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "up to date, reused" in printed and "unet" in printed and "MB" in printed
    assert "[1/7] hashing source model" in caplog.text  # progress: numbered stages (5 networks + 2)


def test_export_progress_is_numbered_stages(onnx_export):
    timings = json.loads((onnx_export("fp32") / "manifest.json").read_text())["timings_s"]
    assert any(k.startswith("unet: export") for k in timings) and all(v >= 0 for v in timings.values())


def test_refuses_to_replace_a_directory_that_is_not_an_export(builtin_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FailedPrecondition, match="holds no export"):
        export_onnx(builtin_dir, tmp_path, ExportOptions(force=True))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_refuses_an_onnx_directory_as_source(onnx_export, tmp_path):
    with pytest.raises(FailedPrecondition, match="already an ONNX export"):
        export_onnx(onnx_export("fp32"), tmp_path / "out", ExportOptions())


def test_fp16_export_keeps_io_float32_and_sensitive_ops_fp32(onnx_export):
    import onnx

    out = onnx_export("fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["precision"] == "fp16"
    assert manifest["components"]["vae_decoder"]["precision"] == "fp32"  # the SD VAE overflows in fp16
    model = onnx.load(str(out / "unet" / "model.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    fp16_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert norms and not any(x in fp16_inits for n in norms for x in n.input)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_int8_export_is_qdq_per_channel_with_sensitive_layers_kept(onnx_export):
    import onnx

    out = onnx_export("int8")
    manifest = json.loads((out / "manifest.json").read_text())
    calibration = manifest["calibration"]
    assert calibration["prompts"] == 16 and calibration["steps"] == 8
    # The built-in model's default scheduler (DPM++ 2M) calls the UNet once per step, both guidance halves.
    assert calibration["samples"] == 16 * 8 and calibration["rows"] == 2 * 16 * 8
    assert calibration["quantization"]["format"] == "QDQ" and calibration["quantization"]["per_channel"]
    model = onnx.load(str(out / "unet" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_output = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def weight_is_quantized(node) -> bool:
        producer = by_output.get(node.input[1])
        return producer is not None and producer.op_type == "DequantizeLinear"

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    kept = [n for n in convs if {"conv_in", "conv_out", "conv_shortcut"} & set(n.name.split("/"))]
    assert kept and not any(weight_is_quantized(n) for n in kept)
    others = [n for n in convs if n not in kept]
    assert others and all(weight_is_quantized(n) for n in others)
    # Per-channel: one weight scale per output channel.
    dq = by_output[others[0].input[1]]
    assert len(onnx.numpy_helper.to_array(inits[dq.input[1]]).shape) == 1
    time_layers = [n for n in model.graph.node if {"time_embedding", "time_emb_proj"} & set(n.name.split("/"))
                   and n.op_type in ("Gemm", "MatMul")]
    assert time_layers and not any(weight_is_quantized(n) for n in time_layers)


def test_int8_ranges_cover_every_calibration_sample(onnx_export, builtin_dir):
    """Each activation's quantization scale is its range over all calibration samples, not only the last ones."""
    import onnx
    from conftest import TEST_CALIBRATION
    from onnx import numpy_helper

    from diffusiond.export.calibration import CalibrationSettings, capture_unet_inputs, for_model

    quantized = onnx.load(str(onnx_export("int8") / "unet" / "model.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    fp32 = onnx.load(str(onnx_export("fp32") / "unet" / "model.onnx"))
    produced = {o for n in fp32.graph.node for o in n.output}
    scales = {n.input[0]: float(initializers[n.input[1]]) for n in quantized.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in produced and n.input[1] in initializers
              and initializers[n.input[1]].size == 1}
    names = sorted(scales)[:40]
    fp32.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    samples = capture_unet_inputs(builtin_dir, for_model(CalibrationSettings(**TEST_CALIBRATION), builtin_dir))
    peaks = []  # per sample: max |x| of each chosen activation
    for sample in samples:
        feeds = {"sample": sample["sample"], "timestep": sample["timestep"].astype(np.float32),
                 "encoder_hidden_states": sample["encoder_hidden_states"]}
        outputs = session.run(names, feeds)
        peaks.append([float(np.abs(o).max()) for o in outputs])
    peaks = np.array(peaks)
    overall, last_prompt = peaks.max(axis=0), peaks[-8:].max(axis=0)
    assert (overall > last_prompt * 1.01).any()  # some activation peaks earlier: the test can tell
    for name, peak in zip(names, overall):
        assert scales[name] * 127 == pytest.approx(peak, rel=1e-3), name
