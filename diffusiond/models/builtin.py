"""The built-in model: a Stable-Diffusion-architecture pipeline small enough for a CPU.

It has the same classes and directory layout as Stable Diffusion 1.x
(UNet2DConditionModel, AutoencoderKL with latent factor 8, CLIPTextModel, a
CLIP-format tokenizer, a PNDM scheduler config), so it exercises exactly the
code paths a real model does. Its weights are seeded random numbers: it draws
noise, not pictures. It is written once into the cache directory and then
loaded like any other model directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from diffusiond.models.tokenizer_files import write_clip_tokenizer

log = logging.getLogger(__name__)

BUILTIN_NAME = "builtin"
# Bump when the recipe below changes, so caches rebuild instead of serving stale weights.
BUILTIN_VERSION = 1

WORDS = (
    "a an the of on in with and at photo painting drawing picture image portrait landscape "
    "red orange yellow green blue purple pink brown black white gray grey "
    "small large big tiny circle square triangle star shape background top bottom left right center "
    "cat dog fox bird tree house mountain river sea sky snow sun moon city car flower forest"
).split()

# SD 1.5's scheduler as shipped (see shared reference facts).
SD15_SCHEDULER_CONFIG = {
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


def cache_root() -> Path:
    """``$DIFFUSIOND_CACHE``, else ``$XDG_CACHE_HOME/diffusiond``, else ``~/.cache/diffusiond``."""
    if os.environ.get("DIFFUSIOND_CACHE"):
        return Path(os.environ["DIFFUSIOND_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "diffusiond"


def builtin_model_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "models" / f"{BUILTIN_NAME}-v{BUILTIN_VERSION}"


def ensure_builtin_model(root: Path | None = None) -> Path:
    """Return the built-in model's directory, creating it on first use."""
    target = builtin_model_dir(root)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("creating the built-in model in %s", target)
    staging = Path(tempfile.mkdtemp(prefix=".builtin-", dir=target.parent))
    try:
        write_builtin_model(staging)
        try:
            staging.rename(target)  # atomic: concurrent starts never see half a model
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_builtin_model(directory: Path) -> None:
    """Create the seeded random-weight SD-architecture model in diffusers layout."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = write_clip_tokenizer(directory / "tokenizer", WORDS)

    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).eval().save_pretrained(directory / "text_encoder")

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    unet.save_pretrained(directory / "unet")

    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(directory / "vae")

    (directory / "scheduler").mkdir(exist_ok=True)
    scheduler_config = {**SD15_SCHEDULER_CONFIG, "_diffusers_version": diffusers.__version__}
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))
