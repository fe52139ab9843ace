"""LoRA files: diffusers/PEFT, diffusers' older forms and kohya all convert to the same update; anything else
is an error naming the file; the weight patcher applies a set exactly and takes it out bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.errors import AdapterFileError, InvalidArgument, NotFound
from diffusiond.models.lora import (
    LoraLayer,
    inspect_file,
    load_adapter,
    parse_adapter_spec,
    save_adapter,
    scan_directory,
)

TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
           "down_blocks.0.resnets.0.conv1")


@pytest.fixture(scope="module")
def unet(builtin_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(builtin_dir / "unet").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shapes(unet):
    return LoraPatcher(unet).weight_shapes()


@pytest.fixture(scope="module")
def layers(shapes) -> list[LoraLayer]:
    g = torch.Generator().manual_seed(0)
    out = []
    for name in TARGETS:
        shape = shapes[name]
        down_shape = (2, *shape[1:]) if len(shape) == 4 else (2, shape[1])
        up_shape = (shape[0], 2, 1, 1) if len(shape) == 4 else (shape[0], 2)
        out.append(LoraLayer(name, torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g), 1.0))
    return out


def deltas(adapter, shapes) -> dict[str, torch.Tensor]:
    return {layer.module: layer.delta(torch.Size(shapes[layer.module])) for layer in adapter.layers}


def test_peft_diffusers_and_kohya_files_convert_to_the_same_updates(tmp_path: Path, layers, shapes):
    alpha = 3.0
    save_adapter(tmp_path / "peft.safetensors", layers, rank=2, alpha=alpha)
    legacy, processor, kohya = {}, {}, {}
    for layer in layers:
        legacy[f"unet.{layer.module}.lora.down.weight"] = layer.down
        legacy[f"unet.{layer.module}.lora.up.weight"] = layer.up
        flat = "lora_unet_" + layer.module.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"] = layer.down
        kohya[f"{flat}.lora_up.weight"] = layer.up
        kohya[f"{flat}.alpha"] = torch.tensor(alpha)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 64)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(64, 2)
    attn = TARGETS[0].rsplit(".", 1)[0]
    processor[f"unet.{attn}.processor.to_q_lora.down.weight"] = layers[0].down
    processor[f"unet.{attn}.processor.to_q_lora.up.weight"] = layers[0].up
    save_file(legacy, str(tmp_path / "legacy.safetensors"), metadata={"lora_alpha": str(alpha)})
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(processor, str(tmp_path / "processor.safetensors"))

    files = {name: inspect_file(tmp_path / f"{name}.safetensors") for name in ("peft", "legacy", "kohya", "processor")}
    assert {n: f.format for n, f in files.items()} == {
        "peft": "peft", "legacy": "diffusers", "kohya": "kohya", "processor": "diffusers"}
    assert files["kohya"].ignored == 1 and files["peft"].rank == 2
    reference = deltas(load_adapter(files["peft"], shapes), shapes)
    assert set(reference) == set(TARGETS)
    for name in ("legacy", "kohya"):
        converted = deltas(load_adapter(files[name], shapes), shapes)
        assert set(converted) == set(reference)
        for module, delta in reference.items():
            torch.testing.assert_close(converted[module], delta, rtol=0, atol=0)
    only_q = deltas(load_adapter(files["processor"], shapes), shapes)  # no alpha: factor rank / rank = 1
    torch.testing.assert_close(only_q[TARGETS[0]] * alpha / 2, reference[TARGETS[0]])


def test_files_that_are_not_lora_adapters_are_errors_naming_the_file(tmp_path: Path, layers, shapes):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    save_file({"text_encoder.q.lora_A.weight": torch.zeros(2, 4), "text_encoder.q.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "te.safetensors"))
    for name, words in (("model", "not a LoRA"), ("junk", "not a readable safetensors"), ("old", "only .safetensors"),
                        ("loha", "LoHa"), ("te", "adapts no UNet layer")):
        path = scan_directory(tmp_path)[name]
        with pytest.raises(AdapterFileError) as info:
            inspect_file(path)
        assert str(path) in str(info.value) and words in str(info.value)

    # An adapter for another base model: a layer the UNet lacks, or one of another shape.
    wrong = [LoraLayer("down_blocks.7.attentions.0.proj_in", torch.zeros(2, 64), torch.zeros(64, 2), 1.0)]
    save_adapter(tmp_path / "other.safetensors", wrong, 2, 2.0, {"base_model": "sd15"})
    with pytest.raises(AdapterFileError, match="other.safetensors.*does not have.*'sd15'"):
        load_adapter(inspect_file(tmp_path / "other.safetensors"), shapes)
    wide = [LoraLayer(TARGETS[0], torch.zeros(2, 320), torch.zeros(320, 2), 1.0)]
    save_adapter(tmp_path / "wide.safetensors", wide, 2, 2.0)
    with pytest.raises(AdapterFileError, match="wide.safetensors.*weight shape"):
        load_adapter(inspect_file(tmp_path / "wide.safetensors"), shapes)


def test_the_patcher_applies_a_set_and_restores_the_base_weights_bit_for_bit(tmp_path: Path, unet, layers, shapes):
    save_adapter(tmp_path / "a.safetensors", layers, 2, 2.0)
    adapter = load_adapter(inspect_file(tmp_path / "a.safetensors"), shapes)
    params = dict(unet.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    patcher = LoraPatcher(unet)
    patcher.apply((("a", 0.5),), [(adapter, 0.5)])
    for layer in adapter.layers:
        name = f"{layer.module}.weight"
        expected = before[name] + 0.5 * layer.delta(before[name].shape)
        torch.testing.assert_close(params[name], expected)
    untouched = "up_blocks.1.attentions.0.proj_out.weight"
    assert torch.equal(params[untouched], before[untouched])
    patcher.apply((("a", -1.0),), [(adapter, -1.0)])  # a swap starts from the originals, not from the last set
    name = f"{TARGETS[0]}.weight"
    torch.testing.assert_close(params[name], before[name] - layers[0].delta(before[name].shape))
    patcher.apply((), [])
    assert all(torch.equal(params[n], before[n]) for n in before)


def test_fused_projections_take_the_update_in_their_rows(builtin_dir, layers):
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(builtin_dir / "unet").eval().requires_grad_(False)
    fused = UNet2DConditionModel.from_pretrained(builtin_dir / "unet").eval().requires_grad_(False)
    fused.fuse_qkv_projections()
    adapter_layers = [layer for layer in layers if ".attn" in layer.module]

    class Adapter:
        layers = adapter_layers

    for unet in (plain, fused):
        LoraPatcher(unet).apply(("x",), [(Adapter, 0.7)])
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    with torch.no_grad():
        a = plain(sample, torch.tensor([10, 500]), context).sample
        b = fused(sample, torch.tensor([10, 500]), context).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_command_line_adapter_specs(tmp_path: Path, layers):
    save_adapter(tmp_path / "style.safetensors", layers, 2, 2.0)
    assert parse_adapter_spec("style:0.8", tmp_path).scale == 0.8
    assert parse_adapter_spec("style", tmp_path).scale == 1.0
    spec = parse_adapter_spec(f"{tmp_path / 'style.safetensors'}:-0.5", None)
    assert (spec.name, spec.scale) == ("style", -0.5)
    with pytest.raises(InvalidArgument, match="between -2.0 and 2.0"):
        parse_adapter_spec("style:3", tmp_path)
    with pytest.raises(NotFound, match="'nope'.*adapters there: style"):
        parse_adapter_spec("nope:1", tmp_path)
