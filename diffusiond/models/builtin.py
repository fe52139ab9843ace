"""The built-in model: a small Stable Diffusion that draws what the shapes data set's prompts ask for.

It has the classes and directory layout of Stable Diffusion 1.x
(UNet2DConditionModel, AutoencoderKL with 4 latent channels, CLIPTextModel, a
CLIP-format tokenizer, a scheduler config), so it
takes exactly the code paths a real model does; its weights were trained from
scratch by ``diffusiond.training.train`` on the procedural shapes data set
(``diffusiond.training.dataset``) and ship with the package, in safetensors.
Prompts like "a small red circle on a blue background, top left" come out as
asked; ``diffusiond eval`` measures how often. Its autoencoder's latent factor
is 4, not SD's 8 (64x64 images, 16x16 latents): ``diffusiond.training.recipe``
says why.

The random-weight architecture presets (``tiny``, ``sd15-half``, ``sd15``)
live in ``diffusiond.models.synthetic``.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusiond.errors import NotFound

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_weights"
# LoRA adapters trained for the built-in model, shipped with the package (``serve --lora-dir builtin``).
BUILTIN_ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"


def cache_root() -> Path:
    """``$DIFFUSIOND_CACHE``, else ``$XDG_CACHE_HOME/diffusiond``, else ``~/.cache/diffusiond``."""
    if os.environ.get("DIFFUSIOND_CACHE"):
        return Path(os.environ["DIFFUSIOND_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "diffusiond"


def builtin_model_dir() -> Path:
    return BUILTIN_DIR


def ensure_builtin_model() -> Path:
    """The built-in model's directory (read-only: it is part of the installed package)."""
    if not (BUILTIN_DIR / "model_index.json").is_file():
        raise NotFound(
            f"the built-in model is missing from this installation ({BUILTIN_DIR}); reinstall diffusiond, "
            "or retrain it with: python -m diffusiond.training.train --work runs/builtin --out " + str(BUILTIN_DIR)
        )
    return BUILTIN_DIR
