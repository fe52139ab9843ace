"""A diffusers UNet run whole or only its shallow blocks, for step caching (DeepCache).

Adjacent denoising steps change a UNet's deep, low-resolution features very
little. So a *full* pass also returns the features entering its last
``depth`` up blocks, and a *shallow* pass recomputes only what those blocks
need fresh (the input convolution, the time embedding and the first down
blocks' skip connections) and runs the last ``depth`` up blocks on the
features cached from the latest full pass. With ``depth`` 1 a shallow pass
costs a fraction of a full one on SD-class UNets.

The full pass is the UNet's own forward, step for step (it returns the same
output); it is written out here because the deep features are an
intermediate. Both torch backends and the ONNX export (which traces the two
passes as graphs) use these functions. Only plain text-conditioned UNets
(SD 1.x/2.x: no class, addition or image-hint embeddings) are supported.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusiond.errors import FailedPrecondition


def check_splittable(unet: Any, depth: int) -> None:
    """FailedPrecondition unless ``unet`` can run split at ``depth``."""
    config = unet.config
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            raise FailedPrecondition(f"step caching supports plain text-conditioned UNets; this one sets {key}")
    up_blocks = len(unet.up_blocks)
    if not 1 <= depth < up_blocks:
        raise FailedPrecondition(f"step-cache depth must be between 1 and {up_blocks - 1} for this UNet, got {depth}")


def shallow_skip_count(unet: Any, depth: int) -> int:
    """How many skip connections (counted from the input convolution on) the last ``depth`` up blocks read."""
    return sum(len(block.resnets) for block in unet.up_blocks[len(unet.up_blocks) - depth :])


def split_forward(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    depth: int,
    deep: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, deep features). ``deep`` None runs the full UNet; else only its shallow blocks on ``deep``."""
    up_blocks = unet.up_blocks
    first_shallow = len(up_blocks) - depth
    upsample_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % upsample_factor for dim in sample.shape[-2:])

    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
    attention = {"encoder_hidden_states": context, "cross_attention_kwargs": cross_attention_kwargs}

    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    needed = shallow_skip_count(unet, depth)
    for block in unet.down_blocks:
        if deep is not None and len(skips) >= needed:
            break
        if getattr(block, "has_cross_attention", False):
            hidden, block_skips = block(hidden_states=hidden, temb=emb, **attention)
        else:
            hidden, block_skips = block(hidden_states=hidden, temb=emb)
        skips += block_skips

    if deep is None:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb, **attention)
            else:
                hidden = unet.mid_block(hidden, emb)
        start = 0
    else:
        skips = skips[:needed]  # the shallow blocks' own skips, not those the deep blocks would read
        hidden = deep
        start = first_shallow

    features = deep
    for index in range(start, len(up_blocks)):
        if index == first_shallow:
            features = hidden
        block = up_blocks[index]
        block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        upsample_size = skips[-1].shape[2:] if index < len(up_blocks) - 1 and forward_upsample_size else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=block_skips,
                           upsample_size=upsample_size, **attention)
        else:
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=block_skips,
                           upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    assert features is not None
    return unet.conv_out(hidden), features
