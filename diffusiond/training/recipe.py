"""What the built-in model is and how it is trained: architecture and hyper-parameters, in one place.

The architecture is Stable Diffusion's classes (AutoencoderKL with 4 latent
channels; UNet2DConditionModel with cross-attention at every level but the
lowest; a CLIP text encoder and a CLIP-format tokenizer), scaled down until the
whole model trains on a 2-core CPU in about 75 minutes.

The autoencoder has three levels, not SD's four: a latent factor of 4, so a
64x64 image is a 16x16x4 latent. At SD's factor 8 (8x8 latents) a small shape
is two latent pixels wide, and the autoencoder alone could not tell a small
triangle from a circle (its reconstructions of held-out renders read as the
right shape 63.5% of the time): corners were lost before the UNet saw them.
The text encoder's context is 32 tokens, not 77 (the longest caption is 13):
cross-attention and the text encoder cost 40% less per training step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from diffusiond.models.synthetic import SD15_SCHEDULER_CONFIG

BUILTIN_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    # One group: on plain-coloured images, small groups normalise colour away.
    "norm_num_groups": 1,
    "sample_size": 64,
}
BUILTIN_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    # 16x16 -> 8x8 -> 4x4: narrow where it is large, wide where the layout is decided.
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
# SD's noise schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
# Sample Steps are Flawed"), with v-prediction and trailing timesteps. On SD's own schedule the last training
# timestep keeps 7% of the image (SNR 0.005): over a 16x16 latent that is enough for the UNet to find the
# shape in the noisy input and leave it where it is, which is what it learnt (position read right 12% of the
# time, chance 11%); sampling starts from pure noise, so the shape went wherever the noise suggested. At zero
# terminal SNR the first step sees no image at all, and only the prompt can say where the shape goes.
BUILTIN_SCHEDULER: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
BUILTIN_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,  # also the tokenizer's model_max_length
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; the same recipe and seed give the same model."""

    seed: int = 0
    vae: dict[str, Any] = field(default_factory=lambda: dict(BUILTIN_VAE))
    unet: dict[str, Any] = field(default_factory=lambda: dict(BUILTIN_UNET))
    text: dict[str, Any] = field(default_factory=lambda: dict(BUILTIN_TEXT))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(BUILTIN_SCHEDULER))

    # Stage 1: the autoencoder, alone: vae_crop_steps on crops, the rest on whole images.
    vae_steps: int = 4300
    vae_crop_steps: int = 4000
    vae_crop: int = 32
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_warmup_steps: int = 50
    kl_weight: float = 1e-6
    # Stage 2: encode a pool of training images once (posterior mean and std), and
    # derive the scaling factor that gives latents unit variance.
    latent_pool_size: int = 16384
    # Stage 3: UNet and text encoder together, on latents of the frozen autoencoder.
    diffusion_steps: int = 2200
    diffusion_batch: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # Weight of an auxiliary loss on the text encoder: linear heads read every attribute of the scene (colour,
    # background, shape, size, position) from its pooled output. Trained on the diffusion loss alone, the
    # encoder let the position words collapse together (their encodings 20x closer than two colours'): the
    # UNet had not learnt to use them yet, so nothing kept them apart, and then it never could. The heads are
    # training-only; the exported text encoder is a plain CLIPTextModel.
    text_attribute_weight: float = 0.1
    # Added to the min-SNR weight of the x0 error. Min-SNR alone weights the noisiest steps by their
    # SNR (zero at the last timestep), and those are the steps that decide where the shape goes.
    high_noise_weight: float = 1.0
    # Stage 4: the VAE's decoder alone, its encoder (so the latents) frozen, as Stable Diffusion's
    # fine-tuned decoders were: on the latent pool's samples against the images they encode.
    decoder_steps: int = 1500
    decoder_batch: int = 16
    decoder_lr: float = 3e-4
    # Stage 5: UNet and text encoder again, from their EMA weights, with the error over the shape (its
    # coverage, pooled to the latent grid and dilated by one latent pixel) weighted refine_shape_weight times
    # more than the background's, and small shapes drawn refine_small_fraction of the time (half the pool is
    # small). Over a 16x16 latent a small shape is about 12 of 256 pixels: its corners were a sliver of the
    # loss, and small squares and triangles came out round (shape read right 73.0% of the time before this
    # stage, 89.5% after it; weight 4 gave 88.5%).
    refine_steps: int = 800
    refine_batch: int = 64
    refine_lr: float = 2e-4
    refine_shape_weight: float = 8.0
    refine_small_fraction: float = 0.75
    # Sampling defaults written into the model (diffusiond.json / scheduler_config.json).
    default_scheduler_class: str = "DPMSolverMultistepScheduler"
    default_steps: int = 20
    default_guidance_scale: float = 4.0

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Identifies the recipe, so a checkpoint is never resumed under a different one. The fields of an
        optional stage the recipe skips (zero steps) are left out, so a recipe has the fingerprint it had
        before that stage existed; so are the sampling defaults: they decide no weight, and a finished run
        can be exported again with others."""
        skipped = [name for stage, fields in OPTIONAL_STAGES.items() if getattr(self, f"{stage}_steps") == 0
                   for name in fields]
        return _digest({key: value for key, value in self.as_dict().items()
                        if key not in (*skipped, *SAMPLING_FIELDS)})

    def without_stages_from(self, stage: str) -> Recipe:
        """This recipe with optional ``stage`` and every optional stage after it skipped: what a finished run
        that can go on into ``stage`` was trained with."""
        later = list(OPTIONAL_STAGES)[list(OPTIONAL_STAGES).index(stage):]
        return self.replace(**{f"{name}_steps": 0 for name in later})

    def vae_fingerprint(self) -> str:
        """Identifies what decides the autoencoder alone, so its stage can be reused by other recipes."""
        return _digest({key: self.as_dict()[key] for key in VAE_FIELDS})


DECODER_FIELDS = ("decoder_steps", "decoder_batch", "decoder_lr")
REFINE_FIELDS = ("refine_steps", "refine_batch", "refine_lr", "refine_shape_weight", "refine_small_fraction")
# Stages that run after the diffusion stage and change no earlier stage's result, in order: a finished run
# without them can be given them later.
OPTIONAL_STAGES: dict[str, tuple[str, ...]] = {"decoder": DECODER_FIELDS, "refine": REFINE_FIELDS}
SAMPLING_FIELDS = ("default_scheduler_class", "default_steps", "default_guidance_scale")
VAE_FIELDS = ("seed", "vae", "vae_steps", "vae_crop_steps", "vae_crop", "vae_batch", "vae_lr", "vae_warmup_steps",
              "kl_weight", "final_lr_fraction")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    "builtin": Recipe(),
    # A few steps of a tiny model: shows the script works end to end (tests, smoke runs).
    "micro": Recipe(
        vae={**BUILTIN_VAE, "block_out_channels": (8, 8, 16)},
        unet={**BUILTIN_UNET, "block_out_channels": (32, 32, 32), "cross_attention_dim": 32},
        text={**BUILTIN_TEXT, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32},
        vae_steps=3,
        vae_crop_steps=1,
        vae_batch=4,
        vae_warmup_steps=1,
        latent_pool_size=16,
        diffusion_steps=4,
        diffusion_batch=4,
        warmup_steps=2,
        decoder_steps=2,
        decoder_batch=2,
        refine_steps=2,
        refine_batch=4,
    ),
}
