"""Stable-Diffusion-architecture models with seeded random weights, written in diffusers layout.

Four presets:

- ``tiny``: the built-in model; runs a step in milliseconds on a CPU (tests, demos).
- ``small``: the serving benchmark's model (``bench/serving.py``): SD 1.5's
  block structure with 1/5 of its UNet channels and one layer per block,
  128x128 native images (16x16 latents), a 4-layer text encoder and a small
  VAE. About 24M UNet parameters: a UNet row costs about 0.1 s on a 2-core
  CPU, dominated by convolution and attention arithmetic like a real model,
  not by per-call overhead like ``tiny``.
- ``sd15-half``: SD 1.5 with half the UNet and VAE channels and the real CLIP
  ViT-L text encoder; a CPU-sized stand-in for speed work.
- ``sd15``: the real SD 1.5 configs (860M-parameter UNet): the real model's
  speed and memory, e.g. for export of models over 2 GB.

Random weights draw noise, but cost exactly what trained weights cost, so
these models are honest for speed, size and plumbing; not for image quality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusiond.models.tokenizer_files import write_clip_tokenizer

# SD 1.5's scheduler as shipped.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

WORDS = (
    "a an the of on in with and at photo painting drawing picture image portrait landscape "
    "red orange yellow green blue purple pink brown black white gray grey "
    "small large big tiny circle square triangle star shape background top bottom left right center "
    "cat dog fox bird tree house mountain river sea sky snow sun moon city car flower forest"
).split()

_SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
_SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


@dataclass(frozen=True)
class SDArchitecture:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    # The real CLIP vocabulary size keeps the embedding table's true cost; the
    # tokenizer written alongside uses only its first few hundred ids.
    text_vocab_size: int | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))


PRESETS: dict[str, SDArchitecture] = {
    "tiny": SDArchitecture(
        unet={
            **_SD15_UNET,
            "sample_size": 8,
            "block_out_channels": (32, 32, 64, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
        },
        vae={**_SD15_VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64},
        text={**_CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32},
    ),
    "small": SDArchitecture(
        unet={
            **_SD15_UNET,
            "sample_size": 16,
            "block_out_channels": (64, 128, 256, 256),
            "layers_per_block": 1,
            "cross_attention_dim": 256,
        },
        vae={**_SD15_VAE, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "sample_size": 128},
        text={**_CLIP_L, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "projection_dim": 256},
    ),
    "sd15-half": SDArchitecture(
        unet={**_SD15_UNET, "block_out_channels": (160, 320, 640, 640)},
        vae={**_SD15_VAE, "block_out_channels": (64, 128, 256, 256)},
        text=dict(_CLIP_L),
        text_vocab_size=49408,
    ),
    "sd15": SDArchitecture(unet=dict(_SD15_UNET), vae=dict(_SD15_VAE), text=dict(_CLIP_L), text_vocab_size=49408),
}


def write_sd_model(directory: Path, preset: str | SDArchitecture, seed: int = 0) -> None:
    """Write a complete diffusers-format StableDiffusionPipeline directory with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = PRESETS[preset] if isinstance(preset, str) else preset
    directory.mkdir(parents=True, exist_ok=True)
    tokens = write_clip_tokenizer(directory / "tokenizer", WORDS)
    bos, eos = tokens - 2, tokens - 1  # the tokenizer puts its special tokens last
    vocab_size = max(tokens, arch.text_vocab_size or 0)

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **arch.text
    )
    CLIPTextModel(text_config).save_pretrained(directory / "text_encoder")
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**arch.unet).save_pretrained(directory / "unet")
    torch.manual_seed(seed + 2)
    AutoencoderKL(**arch.vae).save_pretrained(directory / "vae")

    write_pipeline_files(directory, arch.scheduler)


def write_pipeline_files(directory: Path, scheduler_config: dict[str, Any]) -> None:
    """``scheduler/scheduler_config.json`` and ``model_index.json`` of a StableDiffusionPipeline directory."""
    import diffusers

    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {**scheduler_config, "_diffusers_version": diffusers.__version__}
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))
