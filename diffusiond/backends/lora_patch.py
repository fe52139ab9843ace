"""LoRA adapters on a PyTorch UNet: their updates added to its weights in place, and taken out exactly.

An adapter set is applied by adding ``scale * factor * up @ down`` of every
layer to the weight it adapts (fused, so a denoising step costs what it costs
without adapters), after putting back the original of every weight the
previous set touched. Originals are copied the first time a weight is
touched and restored by copy, so going back to no adapters gives the base
model's weights bit for bit (and frees the copies). Nothing is reloaded from
disk; switching sets costs one small matmul per adapted layer.

Fused projections (the torch-compiled backend's ``fuse_qkv_projections``)
are handled: an update for ``attn.to_k`` lands in the rows of ``attn.to_kv``
(cross-attention) or ``attn.to_qkv`` (self-attention) that hold it. Weights
are changed in place (same tensors, same addresses), so a compiled graph or a
captured CUDA graph that reads them sees the new values without recompiling.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import torch

from diffusiond.models.lora import LoadedAdapter

log = logging.getLogger(__name__)

_PROJECTIONS = ("to_q", "to_k", "to_v")


class LoraPatcher:
    """Applies one adapter set at a time to ``unet``'s weights; thread-compatible (one caller at a time)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = unet
        self._modules = dict(unet.named_modules())
        self._originals: dict[str, torch.Tensor] = {}  # parameter name -> its value before any adapter
        self.active: Hashable = ()

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every adaptable layer (linear and convolution) by its diffusers module name, with its weight's shape."""
        return {
            name: tuple(module.weight.shape)
            for name, module in self._modules.items()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not name.endswith((".to_qkv", ".to_kv"))
        }

    def apply(self, key: Hashable, adapters: Sequence[tuple[LoadedAdapter, float]]) -> None:
        """Make ``adapters`` (each with its scale) the UNet's adapter set; nothing to do if ``key`` is active."""
        if key == self.active:
            return
        with torch.no_grad():
            for name, original in self._originals.items():
                self._parameter(name).copy_(original)
            if not adapters:
                self._originals.clear()
            for adapter, scale in adapters:
                for layer in adapter.layers:
                    name, rows = self._target(layer.module)
                    weight = self._parameter(name)
                    if name not in self._originals:
                        self._originals[name] = weight.detach().clone()
                    view = weight if rows is None else weight[rows[0]:rows[1]]
                    view.add_((layer.delta(view.shape).to(view.device) * scale).to(view.dtype))
        self.active = key
        log.debug("adapter set now %s (%d weights changed)", key or "none", len(self._originals))

    def _target(self, module: str) -> tuple[str, tuple[int, int] | None]:
        """The parameter holding ``module``'s weight, and its rows there when projections are fused."""
        parent_name, _, leaf = module.rpartition(".")
        parent = self._modules.get(parent_name)
        if leaf in _PROJECTIONS and parent is not None and getattr(parent, "fused_projections", False):
            sizes = {p: getattr(parent, p).weight.shape[0] for p in _PROJECTIONS}
            order = ("to_k", "to_v") if parent.is_cross_attention else _PROJECTIONS
            if leaf in order:
                start = sum(sizes[p] for p in order[: order.index(leaf)])
                fused = "to_kv" if parent.is_cross_attention else "to_qkv"
                return f"{parent_name}.{fused}.weight", (start, start + sizes[leaf])
        return f"{module}.weight", None

    def _parameter(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self._modules[module_name], attr)
