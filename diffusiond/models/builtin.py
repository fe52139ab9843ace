"""The built-in model: a Stable-Diffusion-architecture pipeline small enough for a CPU.

It has the same classes and directory layout as Stable Diffusion 1.x
(UNet2DConditionModel, AutoencoderKL with latent factor 8, CLIPTextModel, a
CLIP-format tokenizer, a PNDM scheduler config), so it exercises exactly the
code paths a real model does. Its weights are seeded random numbers: it draws
noise, not pictures. It is written once into the cache directory and then
loaded like any other model directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from diffusiond.models.synthetic import write_sd_model

log = logging.getLogger(__name__)

BUILTIN_NAME = "builtin"
# Bump when the recipe below changes, so caches rebuild instead of serving stale weights.
BUILTIN_VERSION = 1


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
    write_sd_model(directory, "tiny")
