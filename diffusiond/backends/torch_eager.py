"""PyTorch eager backend: the diffusers/transformers modules, run as they are.

Rows carry their own timesteps natively (diffusers embeds a [B] timestep per
row); an allocation failure in any module comes out as ``OutOfMemory``. It
caches cross-attention keys and values per prompt (``torch_attention``) and
can run the UNet split for step caching (``models.unet_split``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch

from diffusiond.backends import cpu_features, torch_attention
from diffusiond.backends.base import (
    DTYPES,
    BackendPlugin,
    BackendSettings,
    ControlRows,
    CrossAttentionKV,
    resolve_device,
    translate_out_of_memory,
)
from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.errors import FailedPrecondition, InvalidArgument
from diffusiond.models import unet_split
from diffusiond.models.lora import LoadedAdapter

log = logging.getLogger(__name__)


class TorchEagerBackend:
    """Runs a diffusers-format model directory with PyTorch modules."""

    name = "torch"

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextModel
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

        if settings.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"{settings.dtype!r} is not one of {', '.join(DTYPES)}")
        self._device = resolve_device(settings.device)
        self._dtype_name = settings.dtype
        dtype = DTYPES[settings.dtype]
        if self._device.type == "cpu" and dtype is torch.float16:
            log.warning("fp16 on the CPU is slow; use fp32, or bf16 where the CPU has AVX512-BF16 or AMX")
        if self._device.type == "cpu" and dtype is torch.bfloat16 and not cpu_features.has_native_bf16():
            log.warning(
                "bf16 on this CPU (%s) has no native support (AVX512-BF16 or AMX) and runs many times "
                "slower than fp32; use --dtype fp32 here", cpu_features.describe()
            )
        for sub in ("unet", "vae", "text_encoder"):
            if not (model_dir / sub).is_dir():
                raise FailedPrecondition(f"{model_dir} has no {sub}/ directory: not a diffusers-format model")

        self._dtype = dtype
        self._text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype)
        self._unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=dtype)
        # SD's VAE overflows in fp16; diffusers flags such VAEs with force_upcast.
        vae_config = AutoencoderKL.load_config(model_dir / "vae")
        upcast = dtype is torch.float16 and vae_config.get("force_upcast", True)
        self._vae_dtype = torch.float32 if upcast else dtype
        self._vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=self._vae_dtype)
        for module in (self._text_encoder, self._unet, self._vae):
            module.to(self._device).eval().requires_grad_(False)
        self._kv_layers = torch_attention.install(self._unet)
        self._split_depths = tuple(d for d in range(1, len(self._unet.up_blocks)) if _splittable(self._unet, d))
        self._lora: LoraPatcher | None = None  # made on first use, after any subclass has rearranged the UNet
        self._controlnets: dict[str, torch.nn.Module] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype_name(self) -> str:
        return self._dtype_name

    @torch.inference_mode()
    @translate_out_of_memory("text_encoder")
    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self._text_encoder(input_ids.to(self._device), attention_mask=None)[0]
        return hidden.float()

    @torch.inference_mode()
    @translate_out_of_memory("text_encoder")
    def cross_attention_kv(self, encoder_hidden_states: torch.Tensor) -> CrossAttentionKV | None:
        if not self._kv_layers:
            return None
        return torch_attention.precompute(self._kv_layers, encoder_hidden_states.to(self._device, self._dtype))

    def _context(self, encoder_hidden_states: torch.Tensor | CrossAttentionKV) -> tuple[torch.Tensor, dict | None]:
        """The encoding in the UNet's dtype, and the attention kwargs that hand it precomputed keys and values."""
        if isinstance(encoder_hidden_states, CrossAttentionKV):
            return encoder_hidden_states.hidden_states, {"kv": encoder_hidden_states}
        return encoder_hidden_states.to(self._dtype), None

    @torch.inference_mode()
    @translate_out_of_memory("unet")
    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | CrossAttentionKV
    ) -> torch.Tensor:
        context, attention = self._context(encoder_hidden_states)
        out = self._unet(
            sample.to(self._dtype), timestep, encoder_hidden_states=context, cross_attention_kwargs=attention,
            return_dict=False,
        )[0]
        return out.float()

    # -- LoRA adapters: fused into the UNet's weights in place, between calls (see lora_patch) -----------

    @property
    def _patcher(self) -> LoraPatcher:
        if self._lora is None:
            self._lora = LoraPatcher(self._unet)
        return self._lora

    def adapter_weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._patcher.weight_shapes()

    def set_adapters(self, key: Hashable, adapters: Sequence[tuple[LoadedAdapter, float]]) -> None:
        self._patcher.apply(key, adapters)

    def attach_controlnet(self, name: str, path: Path) -> None:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(path, torch_dtype=self._dtype)
        check_controlnet_fits(controlnet.config, self._unet.config, name, path)
        self._controlnets[name] = controlnet.to(self._device).eval().requires_grad_(False)

    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(self._controlnets)

    @torch.inference_mode()
    @translate_out_of_memory("unet")
    def unet_controlled(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossAttentionKV,
        control: ControlRows,
    ) -> torch.Tensor:
        context, attention = self._context(encoder_hidden_states)
        sample = sample.to(self._dtype)
        # The ControlNet's own attention layers take the plain encoding (the cached keys are the UNet's).
        down, mid = self._controlnets[control.name](
            sample, timestep, encoder_hidden_states=context, controlnet_cond=control.image.to(self._device, self._dtype),
            conditioning_scale=1.0, return_dict=False,
        )
        scale = control.scale.to(self._device, self._dtype).view(-1, 1, 1, 1)
        out = self._unet(
            sample, timestep, encoder_hidden_states=context, cross_attention_kwargs=attention,
            down_block_additional_residuals=[d * scale for d in down], mid_block_additional_residual=mid * scale,
            return_dict=False,
        )[0]
        return out.float()

    def step_cache_depths(self) -> tuple[int, ...]:
        return self._split_depths

    @torch.inference_mode()
    @translate_out_of_memory("unet")
    def unet_split(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossAttentionKV,
        depth: int,
        deep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context, attention = self._context(encoder_hidden_states)
        out, features = unet_split.split_forward(
            self._unet, sample.to(self._dtype), timestep, context, depth,
            None if deep is None else deep.to(self._dtype), attention,
        )
        return out.float(), features

    @torch.inference_mode()
    @translate_out_of_memory("vae_decode")
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents.to(self._vae_dtype), return_dict=False)[0].float()

    @torch.inference_mode()
    @translate_out_of_memory("vae_encode")
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._vae.encode(images.to(self._vae_dtype)).latent_dist.mean.float()

    def close(self) -> None:
        del self._text_encoder, self._unet, self._vae
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


PLUGIN = BackendPlugin(
    name="torch",
    description="diffusers-format model directories, run by PyTorch as they are",
    load=TorchEagerBackend,
)


def check_controlnet_fits(controlnet: dict, unet: dict, name: str, path: Path) -> None:
    """FailedPrecondition naming the mismatch when a ControlNet's residuals cannot be added to this UNet."""
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "in_channels"):
        mine, theirs = controlnet.get(key), unet.get(key)
        if key == "down_block_types" or key == "block_out_channels":
            mine, theirs = list(mine or []), list(theirs or [])
        if mine != theirs:
            raise FailedPrecondition(
                f"ControlNet {name!r} ({path}) does not fit this model's UNet: its {key} is {mine}, the UNet's {theirs}"
            )


def _splittable(unet: torch.nn.Module, depth: int) -> bool:
    try:
        unet_split.check_splittable(unet, depth)
    except FailedPrecondition:
        return False
    return True
