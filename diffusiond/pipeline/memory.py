"""Recognising and recovering from out-of-memory failures of a backend.

Backends signal that a network call did not fit by raising ``MemoryError`` or
``torch.OutOfMemoryError`` (what PyTorch raises for CUDA); a backend whose
runtime reports it otherwise (e.g. an ONNX Runtime allocation failure) should
re-raise it as ``MemoryError``. The pipeline then retries the work in smaller
pieces (see ``text2img.py``).
"""

from __future__ import annotations

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    torch_oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if torch_oom is not None:
        oom_types += (torch_oom,)
    return isinstance(exc, oom_types)


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back before retrying smaller."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
