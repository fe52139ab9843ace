"""Where a model comes from: the built-in model, a local directory, or a hub id.

A model is always served from a local directory; a hub id is only a way to
fill one (where the network allows). Nothing here needs a network otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from diffusiond.errors import NotFound
from diffusiond.models.builtin import BUILTIN_NAME, ensure_builtin_model

log = logging.getLogger(__name__)

HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.json",
    "tokenizer/*",
    "*/*.safetensors",
    "*/*.onnx",
    "*/*.onnx_data",
    "*/*.pb",
]


@dataclass(frozen=True)
class ModelSource:
    """``[NAME=]PATH`` as given on the command line."""

    name: str
    location: str

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        name, sep, location = text.partition("=")
        if not sep:
            location = text
            name = BUILTIN_NAME if text == BUILTIN_NAME else Path(text.rstrip("/")).name or text
        if not name or not location:
            raise NotFound(f"model {text!r}: expected PATH or NAME=PATH")
        return cls(name=name, location=location)


def resolve_model_dir(location: str) -> Path:
    """A local directory holding the model; the built-in one is created on first use."""
    if location == BUILTIN_NAME:
        return ensure_builtin_model()
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotFound(f"model path {location!r} is a file; give the model's directory")
    looks_like_hub_id = location.count("/") == 1 and not location.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NotFound(f"model directory {location!r} does not exist")
    return _download(location)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log.info("fetching %s from the model hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated model...
        raise NotFound(
            f"model {repo_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(exc).__name__}: {exc}); download it elsewhere and pass its directory"
        ) from None
