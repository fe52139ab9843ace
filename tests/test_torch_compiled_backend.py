"""The torch-compiled backend: what it does to the modules, its options and flags, its cache and warm-up.

A real compile of the built-in UNet takes minutes on two shared cores, so these tests record the
``nn.Module.compile`` calls instead of compiling; they still run the prepared modules (fused QKV, SDPA,
channels_last) against eager. Parity of the compiled code (Inductor) is the conformance suite's
``torch-compiled-fp32`` case, a slow test (``-m slow``).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from diffusiond.backends.base import BackendSettings
from diffusiond.backends.registry import create_backend, warm_up
from diffusiond.backends.torch_compiled import CACHE_ENV, TorchCompiledOptions
from diffusiond.cli import backend_settings_from_args, build_parser
from diffusiond.errors import InvalidArgument
from diffusiond.models.config import load_model_config

# Fused projections and channels_last change the order of float operations only: measured 4e-7 on the
# built-in UNet (fp32, CPU), bound 10x above.
PREPARED_PARITY = 5e-6


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """Records ``nn.Module.compile`` calls (module class, options) instead of compiling; a private cache."""
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    monkeypatch.setenv("DIFFUSIOND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(CACHE_ENV, "")  # restored afterwards: the backend sets it process-wide
    return calls


def load(builtin_dir, **options):
    return create_backend("torch-compiled", builtin_dir, BackendSettings(options=TorchCompiledOptions(**options)))


def attention_processors(module) -> set[type]:
    return {type(p) for p in module.attn_processors.values()}


def inputs(rows: int = 4, side: int = 16, tokens: int = 32):
    """UNet inputs at the built-in model's latent size and text length."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 4, side, side, generator=g), torch.tensor([999.0, 641.0, 250.0, 21.0][:rows]),
            torch.randn(rows, tokens, 64, generator=g))


def test_the_unet_and_vae_decoder_are_prepared_and_compiled_in_place(builtin_dir, compiles, tmp_path, pipeline):
    backend = load(builtin_dir)
    assert compiles == [
        ("UNet2DConditionModel", {"backend": "inductor", "dynamic": None, "mode": "default"}),
        ("Decoder", {"backend": "inductor", "dynamic": None, "mode": "default"}),
    ]
    assert backend.mode == "default" and not backend.cuda_graphs  # CUDA graphs only on CUDA
    assert attention_processors(backend._unet) == attention_processors(backend._vae) == {FusedAttnProcessor2_0}
    assert backend._unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert backend._vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert backend.cache_dir == tmp_path / "cache" / "torch-compile" == type(backend.cache_dir)(os.environ[CACHE_ENV])
    eager = pipeline.backend
    x = inputs()
    want = eager.unet(*x)
    assert float((backend.unet(*x) - want).abs().max() / want.abs().max()) <= PREPARED_PARITY
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = eager.vae_decode(latents)
    assert float((backend.vae_decode(latents) - want).abs().max() / want.abs().max()) <= PREPARED_PARITY
    assert backend.name == "torch-compiled" and backend.dtype_name == "fp32"


def test_options_change_what_is_done(builtin_dir, compiles, tmp_path):
    backend = load(builtin_dir, mode="max-autotune-no-cudagraphs", dynamic="true", fuse_qkv=False, sdpa=False,
                   channels_last=False, cache_dir=str(tmp_path / "mine"))
    assert compiles[0] == ("UNet2DConditionModel", {"backend": "inductor", "dynamic": True,
                                                     "mode": "max-autotune-no-cudagraphs"})
    assert attention_processors(backend._unet) == {AttnProcessor}
    assert backend._unet.conv_in.weight.is_contiguous()
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
    compiles.clear()
    backend = load(builtin_dir, fuse_qkv=False, compiler="aot_eager", dynamic="false")
    assert attention_processors(backend._unet) == {AttnProcessor2_0}
    assert compiles[0] == ("UNet2DConditionModel", {"backend": "aot_eager", "dynamic": False})  # no mode: not Inductor


def test_an_operators_inductor_cache_is_kept(builtin_dir, compiles, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "operator"))
    assert load(builtin_dir).cache_dir == tmp_path / "operator"


def test_contradictory_or_unknown_options_are_refused():
    with pytest.raises(InvalidArgument, match="fused QKV projections run through SDPA"):
        TorchCompiledOptions(sdpa=False)
    with pytest.raises(InvalidArgument, match="'fast' is not one of auto, default, reduce-overhead"):
        TorchCompiledOptions(mode="fast")
    with pytest.raises(InvalidArgument, match="compile dynamic"):
        TorchCompiledOptions(dynamic="rows")


def test_serve_flags_become_its_options():
    args = build_parser("serve").parse_args([
        "serve", "--backend", "torch-compiled", "--compile-mode", "reduce-overhead", "--compile-dynamic", "false",
        "--no-channels-last", "--no-fuse-qkv", "--compile-cache-dir", "/tmp/x",
    ])
    assert backend_settings_from_args(args).options == TorchCompiledOptions(
        mode="reduce-overhead", dynamic="false", channels_last=False, fuse_qkv=False, cache_dir="/tmp/x")


def test_warm_up_runs_the_profiles_shapes_and_logs_the_time(builtin_dir, compiles, caplog):
    backend = load(builtin_dir)
    seen = []
    unet, decode = backend.unet, backend.vae_decode
    backend.unet = lambda sample, *rest: seen.append(("unet", tuple(sample.shape))) or unet(sample, *rest)
    backend.vae_decode = lambda latents: seen.append(("vae_decoder", tuple(latents.shape))) or decode(latents)
    with caplog.at_level(logging.INFO, logger="diffusiond.backends.torch_compiled"):
        warm_up(backend)
    assert backend.warm_up_rows == {"unet": (2, 8), "vae_decoder": (1, 4)}  # profile: 1-4 images of 64x64
    side = load_model_config(builtin_dir).unet_sample_size
    assert seen == [("unet", (2, 4, side, side)), ("unet", (8, 4, side, side)),
                    ("vae_decoder", (1, 4, side, side)), ("vae_decoder", (4, 4, side, side))]
    assert "unet at 8 rows, 64x64" in caplog.text and "compiled and warmed up in" in caplog.text
