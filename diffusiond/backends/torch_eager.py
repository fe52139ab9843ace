"""PyTorch eager backend: the diffusers/transformers modules, run as they are.

Rows carry their own timesteps natively (diffusers embeds a [B] timestep per
row); an allocation failure in any module comes out as ``OutOfMemory``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffusiond.backends import cpu_features
from diffusiond.backends.base import DTYPES, BackendPlugin, BackendSettings, resolve_device, translate_out_of_memory
from diffusiond.errors import FailedPrecondition, InvalidArgument

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
    @translate_out_of_memory("unet")
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        out = self._unet(
            sample.to(self._dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(self._dtype),
            return_dict=False,
        )[0]
        return out.float()

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
