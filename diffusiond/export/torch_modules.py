"""PyTorch modules with exactly the positional inputs and outputs their descriptors name.

The exporter traces these wrappers, so each ONNX graph's inputs and outputs are
the descriptor's, in its order, whatever the diffusers/transformers module's own
signature is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.models.descriptors import (
    CONTROLNET,
    TEXT_ENCODER,
    UNET,
    UNET_CONTROLLED,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)
from diffusiond.models.lora import AdapterSpec, inspect_file, load_adapter
from diffusiond.models.unet_split import check_splittable, split_forward


class TextEncoderOutputs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, attention_mask=None, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetOutputs(torch.nn.Module):
    """The UNet; with a step-cache depth it also returns its deep features at that depth."""

    def __init__(self, model: torch.nn.Module, step_cache_depth: int = 0) -> None:
        super().__init__()
        self.model = model
        self.depth = step_cache_depth

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.depth:
            return split_forward(self.model, sample, timestep, encoder_hidden_states, self.depth)
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetShallowOutputs(torch.nn.Module):
    """The UNet's shallow blocks alone, on the deep features of a full pass (step caching)."""

    def __init__(self, model: torch.nn.Module, step_cache_depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = step_cache_depth

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        deep_features: torch.Tensor,
    ) -> torch.Tensor:
        return split_forward(self.model, sample, timestep, encoder_hidden_states, self.depth, deep_features)[0]


class ControlNetOutputs(torch.nn.Module):
    """The ControlNet's residuals, each row multiplied by its own conditioning scale (requests batched
    together keep their own scales and guidance windows)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False)
        scale = conditioning_scale.view(-1, 1, 1, 1)
        return (*(d * scale for d in down), mid * scale)


class UNetControlledOutputs(torch.nn.Module):
    """The UNet with a ControlNet's residuals added to its skip connections and middle block."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                          down_block_additional_residuals=list(residuals[:-1]),
                          mid_block_additional_residual=residuals[-1], return_dict=False)[0]


class VaeDecoderOutputs(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderOutputs(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].parameters


def fuse_adapters(unet: torch.nn.Module, loras: Sequence[AdapterSpec]) -> None:
    """Add each adapter's update, at its scale, to ``unet``'s weights for good (AdapterFileError naming a file
    that is no LoRA or does not fit this UNet)."""
    patcher = LoraPatcher(unet)
    shapes = patcher.weight_shapes()
    loaded = [(load_adapter(inspect_file(spec.path, spec.name), shapes), spec.scale) for spec in loras]
    patcher.apply(tuple((spec.name, spec.scale) for spec in loras), loaded)


def load_torch_network(
    model_dir: Path,
    component: str,
    step_cache_depth: int = 0,
    loras: Sequence[AdapterSpec] = (),
    controlnet_dir: Path | None = None,
) -> torch.nn.Module:
    """One network of a diffusers-format model, fp32, eval mode, wrapped to its descriptor's I/O; the UNet
    with ``loras`` fused into its weights (``controlnet``: the ControlNet in ``controlnet_dir``).

    Loaded one at a time so that exporting a large model holds one network in memory, not four.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    module: torch.nn.Module
    if component == TEXT_ENCODER:
        from transformers import CLIPTextModel

        module = TextEncoderOutputs(CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32, low_cpu_mem_usage=False))
    elif component == CONTROLNET:
        from diffusers import ControlNetModel

        if controlnet_dir is None:
            raise ValueError("the controlnet component needs controlnet_dir")
        module = ControlNetOutputs(ControlNetModel.from_pretrained(controlnet_dir, torch_dtype=torch.float32, low_cpu_mem_usage=False))
    elif component == UNET_CONTROLLED:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        if loras:
            fuse_adapters(unet, loras)
        module = UNetControlledOutputs(unet)
    elif component in (UNET, UNET_SHALLOW):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        if step_cache_depth:
            check_splittable(unet, step_cache_depth)
        if loras:
            fuse_adapters(unet, loras)
        module = UNetOutputs(unet, step_cache_depth) if component == UNET else UNetShallowOutputs(unet, step_cache_depth)
    elif component in (VAE_DECODER, VAE_ENCODER):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        module = VaeDecoderOutputs(vae) if component == VAE_DECODER else VaeEncoderOutputs(vae)
    else:
        raise ValueError(f"unknown component {component!r}")
    return module.eval().requires_grad_(False)
