"""The ONNX Runtime backend: parity with eager PyTorch, sizes, manifest checks, Optimum-style exports."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from diffusiond.backends.base import BackendSettings
from diffusiond.backends.onnxruntime import OnnxRuntimeOptions, choose_providers
from diffusiond.cli import main
from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.eval.compare import cosine, psnr
from diffusiond.pipeline.observers import LastLatentsObserver
from diffusiond.pipeline.request import GenerationRequest, PreviewKind, PreviewSpec
from diffusiond.service.models import load_model
from diffusiond.training.dataset import held_out_prompts

# Same seed, same request, the built-in model on the CPU (8-bit images, PSNR over all pixels):
FP32_MIN_PSNR_DB = 45.0  # float rounding between two fp32 runtimes
FP16_MIN_PSNR_DB = 30.0  # fp16 weights and activations, sensitive ops in fp32
# Final latents, INT8 UNet vs fp32 eager. The trained built-in model places a shape where small
# features of the noise put it, so quantization error can move a shape: measured 0.94-0.997 on
# held-out prompts with a correct calibration, 0.38-0.63 with ranges from a few samples only.
INT8_MIN_LATENT_COSINE = 0.92
# Bytes of the UNet file(s) relative to the fp32 export's. On SD-proportioned UNets (the issue's
# bounds, fp16 <= 55%, int8 <= 30%) this is checked by tests/test_export_sizes_slow.py and the benchmark.
# The built-in model is a poor judge of size: its graph (node and tensor names, shape arithmetic) is
# 10% of its fp32 file, and the layers the INT8 recipe keeps in fp32 (time_emb_proj above all)
# hold 11% of its weights against about 3% in SD 1.5. Its bounds say so.
TINY_FP16_MAX_SIZE_RATIO = 0.58
TINY_INT8_MAX_SIZE_RATIO = 0.50


def request(scheduler: str = "dpmpp_2m", **fields) -> GenerationRequest:
    """A prompt the built-in model knows, at its default guidance (4)."""
    base = dict(
        request_id="parity", model="builtin", prompt="a large red circle on a blue background, top left",
        negative_prompt="", width=64, height=64, steps=10, guidance_scale=4.0, seed=1234, num_images=2,
        scheduler=scheduler,
        preview=PreviewSpec(PreviewKind.LATENT, every_n_steps=1000),
    )
    base.update(fields)
    return GenerationRequest(**base)


def run(pipeline, req: GenerationRequest) -> tuple[np.ndarray, np.ndarray]:
    observer = LastLatentsObserver()
    result = pipeline.generate(req, observer)
    return result.images_uint8(), observer.latents


@pytest.fixture(scope="module")
def ort_models(onnx_export):
    loaded = {}

    def get(precision: str):
        if precision not in loaded:
            loaded[precision] = load_model("builtin", onnx_export(precision), "onnxruntime")
        return loaded[precision]

    yield get
    for model in loaded.values():
        model.backend.close()


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_fp32_images_match_eager(pipeline, ort_models, scheduler, record_property):
    req = request(scheduler, width=64, height=72)
    expected, _ = run(pipeline, req)
    got, _ = run(ort_models("fp32").pipeline, req)
    record_property("psnr_db", psnr(got, expected))
    assert got.shape == expected.shape == (2, 72, 64, 3)
    assert psnr(got, expected) >= FP32_MIN_PSNR_DB


def test_fp16_images_match_eager(pipeline, ort_models, record_property):
    expected, _ = run(pipeline, request())
    got, _ = run(ort_models("fp16").pipeline, request())
    record_property("psnr_db", psnr(got, expected))
    assert psnr(got, expected) >= FP16_MIN_PSNR_DB


@pytest.mark.parametrize("prompt", [scene.caption for scene in held_out_prompts(2)])
def test_int8_final_latents_match_eager(pipeline, ort_models, prompt, record_property):
    """Calibrated on the model's own prompts (its validation split); tested on held-out ones."""
    expected_images, expected = run(pipeline, request(prompt=prompt))
    images, latents = run(ort_models("int8").pipeline, request(prompt=prompt))
    similarity = cosine(latents, expected)
    record_property("latent_cosine", similarity)
    record_property("image_psnr_db", psnr(images, expected_images))
    logging.getLogger(__name__).info("int8 %r: latent cosine %.4f, image PSNR %.1f dB",
                                     prompt, similarity, psnr(images, expected_images))
    assert similarity >= INT8_MIN_LATENT_COSINE


def test_reduced_precisions_are_smaller(onnx_export):
    def unet_bytes(precision: str) -> int:
        manifest = json.loads((onnx_export(precision) / "manifest.json").read_text())
        return manifest["components"]["unet"]["bytes"]

    fp32 = unet_bytes("fp32")
    assert fp32 == (onnx_export("fp32") / "unet" / "model.onnx").stat().st_size
    assert unet_bytes("fp16") <= TINY_FP16_MAX_SIZE_RATIO * fp32
    assert unet_bytes("int8") <= TINY_INT8_MAX_SIZE_RATIO * fp32


def test_backend_reports_precision_and_providers(ort_models):
    backend = ort_models("int8").backend
    assert backend.name == "onnxruntime" and backend.dtype_name == "int8"
    assert backend.providers == ["CPUExecutionProvider"]


def test_vae_encode_returns_the_mean(pipeline, ort_models):
    import torch

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = pipeline.backend.vae_encode(images)
    got = ort_models("fp32").backend.vae_encode(images)
    assert got.shape == expected.shape == (2, 4, 16, 16)
    assert torch.allclose(got, expected, atol=1e-4)


# -- providers and options ---------------------------------------------------------------------


def test_provider_choice():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers((), available) == available
    assert choose_providers((), ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(("cuda", "cpu"), available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(FailedPrecondition, match="TensorrtExecutionProvider was asked for.*only CPUExecutionProvider"):
        choose_providers(("tensorrt",), ["CPUExecutionProvider"])
    with pytest.raises(InvalidArgument, match="'tpu' is not one of tensorrt, cuda, cpu"):
        choose_providers(("tpu",), available)


def test_threads_and_graph_optimization_options(onnx_export):
    settings = BackendSettings(threads=1, options=OnnxRuntimeOptions(providers=("cpu",), graph_optimization="basic"))
    model = load_model("builtin", onnx_export("fp32"), "onnxruntime", settings)
    try:
        options = model.backend.graphs["unet"].session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert str(options.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
        assert model.pipeline.generate(request(steps=2, preview=PreviewSpec())).images.shape == (2, 64, 64, 3)
    finally:
        model.backend.close()
    with pytest.raises(InvalidArgument, match="graph_optimization"):
        load_model("builtin", onnx_export("fp32"), "onnxruntime",
                   BackendSettings(options=OnnxRuntimeOptions(graph_optimization="max")))


# -- manifest checks ------------------------------------------------------------------------------


def copy_export(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return dst


def test_refuses_a_manifest_without_a_component(onnx_export, tmp_path):
    out = copy_export(onnx_export("fp32"), tmp_path / "m", lambda m: m["components"].pop("vae_decoder"))
    with pytest.raises(FailedPrecondition, match="lists no vae_decoder component in its manifest"):
        load_model("builtin", out, "onnxruntime")


def test_refuses_a_missing_component_file(onnx_export, tmp_path):
    out = copy_export(onnx_export("fp32"), tmp_path / "m")
    (out / "unet" / "model.onnx").unlink()
    with pytest.raises(FailedPrecondition, match="holds no unet/model.onnx"):
        load_model("builtin", out, "onnxruntime")
    out2 = copy_export(onnx_export("fp32"), tmp_path / "m2")
    (out2 / "vae_encoder" / "model.onnx").unlink()
    with pytest.raises(FailedPrecondition, match="incomplete: vae_encoder: vae_encoder/model.onnx is missing"):
        load_model("builtin", out2, "onnxruntime")


def test_refuses_another_precision_or_source(onnx_export):
    with pytest.raises(FailedPrecondition, match="holds fp16 networks, but precision int8 was asked for"):
        load_model("builtin", onnx_export("fp16"), "onnxruntime", BackendSettings(expect_precision="int8"))
    with pytest.raises(FailedPrecondition, match="was made from another model"):
        load_model("builtin", onnx_export("fp32"), "onnxruntime",
                   BackendSettings(expect_source_sha256="0123456789abcdef"))
    source = json.loads((onnx_export("fp32") / "manifest.json").read_text())["source"]["sha256"]
    ok = load_model("builtin", onnx_export("fp32"), "onnxruntime",
                    BackendSettings(expect_precision="fp32", expect_source_sha256=source[:16]))
    ok.backend.close()


def test_refuses_a_diffusers_directory(builtin_dir):
    with pytest.raises(FailedPrecondition, match="not an ONNX export.*diffusiond export onnx"):
        load_model("builtin", builtin_dir, "onnxruntime")


def test_serve_refuses_with_the_reason(onnx_export, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["serve", "--port", "0", "--backend", "onnxruntime", "--model", str(onnx_export("fp16")),
                     "--precision", "int8", "--no-warmup"])
    assert code == 2
    assert "cannot serve" in caplog.text and "holds fp16 networks, but precision int8 was asked for" in caplog.text


# -- directories from other exporters -------------------------------------------------------------


def optimum_style(src, dst):
    """A copy of an export with Optimum's variations: int64 timestep, int32 token ids, no manifest.

    (``optimum-cli`` itself cannot be installed next to this diffusers; these are the I/O
    differences its exports have.)
    """
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    for component, name, new_type in (("unet", "timestep", TensorProto.INT64), ("text_encoder", "input_ids", TensorProto.INT32)):
        path = dst / component / "model.onnx"
        model = onnx.load(str(path))
        graph_input = next(i for i in model.graph.input if i.name == name)
        old_type = graph_input.type.tensor_type.elem_type
        graph_input.type.tensor_type.elem_type = new_type
        cast_out = f"{name}_as_exported"
        for node in model.graph.node:
            node.input[:] = [cast_out if x == name else x for x in node.input]
        model.graph.node.insert(0, helper.make_node("Cast", [name], [cast_out], to=old_type))
        onnx.save(model, str(path))
    return dst


def test_serves_an_optimum_style_directory_with_a_warning(onnx_export, pipeline, tmp_path, caplog):
    out = optimum_style(onnx_export("fp32"), tmp_path / "optimum")
    with caplog.at_level(logging.WARNING):
        model = load_model("builtin", out, "onnxruntime")
    try:
        assert "has no manifest.json" in caplog.text
        assert model.backend.dtype_name == "fp32"
        req = request("ddim")  # integer timesteps: an int64 timestep input loses nothing
        expected, _ = run(pipeline, req)
        got, _ = run(model.pipeline, req)
        assert psnr(got, expected) >= FP32_MIN_PSNR_DB
    finally:
        model.backend.close()
    with pytest.raises(FailedPrecondition, match="no manifest.json, so its source model cannot be checked"):
        load_model("builtin", out, "onnxruntime", BackendSettings(expect_source_sha256="0123456789abcdef"))


def one_timestep_per_call(src, dst, shape: tuple[int, ...]):
    """A copy of an export whose UNet takes one timestep for the whole call: a scalar, or a fixed [1]
    (as some Optimum exports declare it). The graph broadcasts it to every row."""
    import onnx

    shutil.copytree(src, dst)
    path = dst / "unet" / "model.onnx"
    model = onnx.load(str(path))
    dims = next(i for i in model.graph.input if i.name == "timestep").type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        dims.add().dim_value = size
    onnx.save(model, str(path))
    return dst


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "one-element"])
def test_a_unet_taking_one_timestep_per_call_still_gives_each_row_its_own(onnx_export, builtin_dir, tmp_path,
                                                                          monkeypatch, shape):
    import torch

    from diffusiond.backends.registry import create_backend
    from diffusiond.models.descriptors import descriptors_for

    per_row = create_backend("onnxruntime", onnx_export("fp32"), BackendSettings())
    per_call = create_backend("onnxruntime", one_timestep_per_call(onnx_export("fp32"), tmp_path / "m", shape),
                              BackendSettings())
    try:
        assert per_call.graphs["unet"].inputs["timestep"].shape == shape
        feeds = descriptors_for(builtin_dir)["unet"].sample_inputs(5, 64, 64)
        sample, context = torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["encoder_hidden_states"])
        t = torch.tensor([999.0, 10.0, 999.0, 500.0, 10.0])
        session = per_call.graphs["unet"].session
        calls = []

        def run(outputs, arrays, run=session.run):
            calls.append((arrays["sample"].shape[0], arrays["timestep"].shape, float(arrays["timestep"].reshape(-1)[0])))
            return run(outputs, arrays)

        monkeypatch.setattr(session, "run", run)
        got = per_call.unet(sample, t, context)
        expected = per_row.unet(sample, t, context)
        assert sorted(calls) == [(1, shape, 500.0), (2, shape, 10.0), (2, shape, 999.0)]  # one call per timestep
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # rows back in their order
        calls.clear()
        per_call.unet(sample, torch.full((5,), 250.0), context)
        assert calls == [(5, shape, 250.0)]  # one timestep: one call
    finally:
        per_row.close()
        per_call.close()
