"""PyTorch modules with exactly the positional inputs and outputs their descriptors name.

The exporter traces these wrappers, so each ONNX graph's inputs and outputs are
the descriptor's, in its order, whatever the diffusers/transformers module's own
signature is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusiond.models.descriptors import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER


class TextEncoderOutputs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, attention_mask=None, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetOutputs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


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


def load_torch_network(model_dir: Path, component: str) -> torch.nn.Module:
    """One network of a diffusers-format model, fp32, eval mode, wrapped to its descriptor's I/O.

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
    elif component == UNET:
        from diffusers import UNet2DConditionModel

        module = UNetOutputs(UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False))
    elif component in (VAE_DECODER, VAE_ENCODER):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        module = VaeDecoderOutputs(vae) if component == VAE_DECODER else VaeEncoderOutputs(vae)
    else:
        raise ValueError(f"unknown component {component!r}")
    return module.eval().requires_grad_(False)
