"""Cross-attention keys and values computed once per prompt, not at every step (PyTorch UNets).

A request's text encoding is fixed for its whole denoising, and so are the key
and value projections every cross-attention layer makes of it. ``precompute``
makes them once per encoding (the prompt cache keeps them with it); during a
UNet call ``CachedKVProcessor`` takes them instead of projecting the encoding
again. Self-attention and any layer the processor was not built for run
diffusers' own processor unchanged. The result equals the uncached
computation up to float rounding (the projections run on one row rather than
on the whole batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from diffusiond.backends.base import CrossAttentionKV


def cross_attention_layers(unet: torch.nn.Module) -> list[Any]:
    """The UNet's cross-attention modules, in a fixed order (the order of ``CrossAttentionKV``'s lists)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def _cacheable(attn: Any) -> bool:
    """The plain SD cross-attention this module's shortcut reproduces exactly."""
    return (
        attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
    )


class CachedKVProcessor:
    """Runs one attention layer; a cross-attention layer takes its precomputed keys and values when given."""

    def __init__(self, slot: int | None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.slot = slot  # this layer's index in CrossAttentionKV, None: never cached
        self._default = AttnProcessor2_0()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv: CrossAttentionKV | None = None,
    ) -> torch.Tensor:
        if kv is None or self.slot is None or attention_mask is not None or hidden_states.ndim != 3:
            return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = kv.keys[self.slot], kv.values[self.slot]
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install(unet: torch.nn.Module) -> list[Any]:
    """Give every attention layer a ``CachedKVProcessor``; return the cacheable cross-attention layers."""
    from diffusers.models.attention_processor import Attention

    cacheable = [layer for layer in cross_attention_layers(unet) if _cacheable(layer)]
    slots = {id(layer): index for index, layer in enumerate(cacheable)}
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(CachedKVProcessor(slots.get(id(module))))
    return cacheable


def precompute(layers: list[Any], encoder_hidden_states: torch.Tensor) -> CrossAttentionKV:
    """Each layer's key and value projections of ``encoder_hidden_states`` (in the layers' own dtype)."""
    keys, values = [], []
    for attn in layers:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        keys.append(attn.to_k(context))
        values.append(attn.to_v(context))
    return CrossAttentionKV(encoder_hidden_states, tuple(keys), tuple(values))
