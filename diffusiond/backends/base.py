"""The one protocol every inference backend implements, and what a backend plug-in declares.

A backend runs networks and nothing else: the text-to-image loop, schedulers,
guidance, previews and batching live above it and never change when a backend
is added. All tensors crossing this boundary are ``torch`` tensors on
``backend.device`` in float32 (token ids in int64), whatever precision the
backend computes in internally, so the scheduler arithmetic is the same on
every backend. Rows of one call are independent: each may carry its own
timestep, and a call that does not fit in memory raises
``diffusiond.errors.OutOfMemory`` (see ``translate_out_of_memory``) so the caller can
retry it with fewer rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import torch

from diffusiond.errors import FailedPrecondition, InvalidArgument, OutOfMemory
from diffusiond.models.lora import LoadedAdapter

# An adapter set as requests carry it: (name, scale) pairs sorted by name, no zero scales; () is none.
AdapterSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class BackendSettings:
    """What an operator chooses when starting a backend: the fields every backend reads, and its own options."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    dtype: str = "fp32"  # "fp32", "fp16", "bf16"
    threads: int = 0  # intra-op CPU threads; 0: the runtime's default (one per core)
    # What an exported artifact must be; a manifest that says otherwise is refused.
    expect_precision: str = ""  # "fp32", "fp16", "int8"; empty: whatever it holds
    expect_source_sha256: str = ""  # a prefix of the source model's hash; empty: any source
    # The chosen backend's own options: an instance of its plug-in's ``options_type``
    # (None: that type's defaults, which are also its CLI defaults).
    options: Any = None


@runtime_checkable
class Backend(Protocol):
    name: str  # the plug-in's name: "torch", "onnxruntime", "tensorrt"

    @property
    def device(self) -> torch.device:
        """Where the pipeline keeps latents for this backend."""
        ...

    @property
    def dtype_name(self) -> str:
        """The precision the networks compute in, for ListModels and logs."""
        ...

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 token ids -> [B, T, D] hidden states (the text encoder's last layer)."""
        ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] scaled model input, [B] timesteps (may differ per row), [B, T, D] context
        -> [B, C, h, w] model output."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] unscaled latents -> [B, 3, H, W] images in about [-1, 1]."""
        ...

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [-1, 1] -> [B, C, h, w] unscaled latents (the distribution's mean)."""
        ...

    def close(self) -> None:
        """Free device memory and sessions."""
        ...


@dataclass(frozen=True)
class CrossAttentionKV:
    """A text encoding with every cross-attention layer's key and value projections of it.

    Made once per prompt by a backend that ``CachesCrossAttention``; the
    pipeline stacks the rows of several requests (``cat``), repeats a prompt's
    row for its images (``expand``) and cuts rows (``kv[a:b]``) as it does with
    plain encodings, and passes it to ``unet`` in their place. Tensors are the
    backend's own (device, dtype): opaque to everything else.
    """

    hidden_states: torch.Tensor  # [B, T, D]
    keys: tuple[torch.Tensor, ...]  # per cross-attention layer, [B, T, inner]
    values: tuple[torch.Tensor, ...]

    @property
    def rows(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, rows: slice) -> CrossAttentionKV:
        return CrossAttentionKV(
            self.hidden_states[rows], tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values)
        )

    def expand(self, rows: int) -> CrossAttentionKV:
        def repeat(t: torch.Tensor) -> torch.Tensor:
            return t.expand(rows, *t.shape[1:])

        return CrossAttentionKV(
            repeat(self.hidden_states), tuple(map(repeat, self.keys)), tuple(map(repeat, self.values))
        )

    @staticmethod
    def cat(items: list[CrossAttentionKV]) -> CrossAttentionKV:
        if len(items) == 1:
            return items[0]
        return CrossAttentionKV(
            torch.cat([i.hidden_states for i in items]),
            tuple(torch.cat(layer) for layer in zip(*(i.keys for i in items))),
            tuple(torch.cat(layer) for layer in zip(*(i.values for i in items))),
        )


@runtime_checkable
class CachesCrossAttention(Protocol):
    """A backend whose ``unet`` takes a ``CrossAttentionKV`` in place of the encoding (PyTorch UNets)."""

    def cross_attention_kv(self, encoder_hidden_states: torch.Tensor) -> CrossAttentionKV | None:
        """[B, T, D] float32 encoding -> its per-layer keys and values, computed once (None: this
        backend's layers cannot take them, e.g. after fusing their projections)."""
        ...


@runtime_checkable
class CachesDeepFeatures(Protocol):
    """A backend that can run the UNet whole or only its shallow blocks (step caching, DeepCache)."""

    def step_cache_depths(self) -> tuple[int, ...]:
        """The branch depths it can run (empty: none)."""
        ...

    def unet_split(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossAttentionKV,
        depth: int,
        deep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(model output, deep features). ``deep`` None: the full UNet, returning the features its last
        ``depth`` up blocks read, to reuse; else only the shallow blocks, run on ``deep`` (returned as is)."""
        ...


@runtime_checkable
class AppliesAdapters(Protocol):
    """A backend that applies LoRA adapters to its UNet between calls (the PyTorch backends)."""

    def adapter_weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The UNet's adaptable layers (diffusers module names) and their weight shapes."""
        ...

    def set_adapters(self, key: Hashable, adapters: Sequence[tuple[LoadedAdapter, float]]) -> None:
        """Make ``adapters`` (with their scales) the set every later UNet call runs with; () the base model.
        ``key`` names the set: nothing is done when it is the active one."""
        ...


@runtime_checkable
class HoldsFusedAdapters(Protocol):
    """A backend whose networks have adapters fused into their weights at export (fixed, maybe none)."""

    @property
    def fused_adapters(self) -> AdapterSet:
        ...


@dataclass(frozen=True)
class ControlRows:
    """A ControlNet's inputs for the rows of one UNet call; sliced by rows like the other inputs.

    Every row has its own control image and its own conditioning scale (0 for
    a row outside its request's guidance window), so requests with the same
    ControlNet share one call whatever their images, scales and windows.
    """

    name: str  # the ControlNet, as attached
    image: torch.Tensor  # [B, 3, H, W] float32 in [0, 1], the image's own size (8x the latents')
    scale: torch.Tensor  # [B] float32: the residuals of row i are multiplied by scale[i]

    @property
    def shape(self) -> torch.Size:
        return self.image.shape

    def __getitem__(self, rows: slice) -> ControlRows:
        return ControlRows(self.name, self.image[rows], self.scale[rows])


@runtime_checkable
class RunsControlNets(Protocol):
    """A backend that can run ControlNets beside its UNet (diffusers' ``ControlNetModel`` semantics)."""

    def attach_controlnet(self, name: str, path: Path) -> None:
        """Load the ControlNet at ``path`` under ``name``; FailedPrecondition when it cannot steer this UNet."""
        ...

    def controlnet_names(self) -> tuple[str, ...]:
        """The attached ControlNets, by name."""
        ...

    def unet_controlled(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossAttentionKV,
        control: ControlRows,
    ) -> torch.Tensor:
        """``unet`` with the named ControlNet's residuals (times each row's scale) added to its skip
        connections and middle block."""
        ...


@dataclass(frozen=True)
class BackendPlugin:
    """What one backend file declares (as its module-level ``PLUGIN``) to be served and configured.

    The registry finds it; the CLI builds ``--backend`` and the backend's
    argument group from it; ``create_backend`` calls ``load`` with the
    backend's options filled in. Nothing else names a backend.
    """

    name: str  # the --backend value
    description: str  # one line for --help: what it runs and from which directory
    load: Callable[[Path, BackendSettings], Backend]
    options_type: type | None = None  # a frozen dataclass of its own options; defaults = CLI defaults
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None  # its own CLI flags
    options_from_args: Callable[[argparse.Namespace], Any] | None = None  # those flags -> options_type
    # Run after loading, before serving: e.g. run each network at its optimisation shapes so the
    # first request does not pay for kernel selection or lazy allocation.
    warm_up: Callable[[Backend], None] | None = None

    def default_options(self) -> Any:
        return self.options_type() if self.options_type is not None else None


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device this build can use; InvalidArgument or FailedPrecondition saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument("device", f"{name!r} is not a device name ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {name!r} was asked for, but this PyTorch build sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument("device", f"{name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def is_torch_out_of_memory(exc: BaseException) -> bool:
    """What PyTorch raises when an allocation fails (on CUDA ``torch.OutOfMemoryError``; on the host ``MemoryError``)."""
    torch_oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (torch_oom is not None and isinstance(exc, torch_oom))


class translate_out_of_memory:
    """Turns a runtime's out-of-memory failure inside the block into ``OutOfMemory``; other errors pass.

    ``is_runtime_oom`` recognises the runtime's own form (an ONNX Runtime
    allocation failure, a TensorRT one); PyTorch's and ``MemoryError`` are
    always recognised. The original exception's traceback is dropped before
    raising: it holds the frames of the failed call, and with them the
    intermediate tensors the caller needs freed before it retries with fewer
    rows. Usable as a context manager or a decorator.
    """

    def __init__(self, network: str, is_runtime_oom: Callable[[BaseException], bool] | None = None) -> None:
        self.network = network
        self.is_runtime_oom = is_runtime_oom

    def __enter__(self) -> translate_out_of_memory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or isinstance(exc, OutOfMemory):
            return False
        if not (is_torch_out_of_memory(exc) or (self.is_runtime_oom is not None and self.is_runtime_oom(exc))):
            return False
        message = f"{self.network} ran out of memory: {exc}"
        exc.__traceback__ = None
        del exc, tb  # this frame ends up in the new traceback: keep it from holding the old one
        raise OutOfMemory(message) from None

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        import functools

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with translate_out_of_memory(self.network, self.is_runtime_oom):
                return fn(*args, **kwargs)

        return wrapper
