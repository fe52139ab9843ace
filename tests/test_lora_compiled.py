"""LoRA on the torch-compiled backend: fused projections take the updates in their rows, the compiled module
sees the changed weights in place (no reload), and scale 0 is its base image bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_lora_serving import random_adapter

from diffusiond.backends.base import BackendSettings
from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.backends.torch_compiled import TorchCompiledOptions
from diffusiond.service.adapters import AdapterLibrary
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, builtin_dir):
    from diffusers import UNet2DConditionModel

    directory = tmp_path_factory.mktemp("compiled-loras")
    shapes = LoraPatcher(UNet2DConditionModel.from_pretrained(builtin_dir / "unet")).weight_shapes()
    random_adapter(directory / "alpha.safetensors", shapes, 1, suffixes=("attn1.to_k", "attn2.to_v", "attn1.to_q"))
    return directory


@pytest.mark.slow  # minutes on 2 shared cores: Dynamo traces the UNet at two row counts
def test_compiled_backend_applies_adapters_like_eager(builtin_dir, lora_dir):
    library = AdapterLibrary(lora_dir)
    # aot_eager: Dynamo's graph capture and AOT autograd without code generation (Inductor takes minutes here).
    settings = BackendSettings(options=TorchCompiledOptions(compiler="aot_eager", dynamic="true"))
    compiled = load_model("c", builtin_dir, backend_name="torch-compiled", settings=settings, lora_library=library)
    eager = load_model("e", builtin_dir, lora_library=library)

    def image(model, scale):
        request = resolve(GenerationParams(prompt="a large yellow circle on a black background", seed=2, steps=4,
                                           loras=(("alpha", scale),)), model)
        return model.pipeline.generate(request).images_uint8()[0].astype(int)

    import torch._dynamo.utils as dynamo_utils

    base = image(compiled, 0.0)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    with_lora = image(compiled, 1.0)
    assert np.abs(with_lora - base).mean() > 2
    assert np.abs(with_lora - image(eager, 1.0)).max() <= 6  # fused QKV rows hold the same update
    assert np.array_equal(image(compiled, 0.0), base)  # back to the exact base weights
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # swapping adapters compiled nothing new
