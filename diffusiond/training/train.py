"""Train the built-in model on the procedural shapes data set, on a CPU, resumably.

    python -m diffusiond.training.train --work runs/builtin --out diffusiond/models/builtin_weights

Stages, one after the other:

1. ``vae``: the autoencoder alone (L1 reconstruction plus a tiny KL term, as
   Stable Diffusion's VAE), on freshly drawn images: first on 32x32 crops
   around the shape (a quarter of the cost per image, so four times the
   steps; the autoencoder is convolutional), then on whole images, so its
   attention and normalisation see the statistics of full 64x64 images;
2. ``latents``: a pool of freshly drawn training images is encoded once (the
   posterior's mean and standard deviation, so every use still samples anew),
   and the inverse of the latents' standard deviation becomes the VAE's
   ``scaling_factor`` (the UNet sees unit-variance latents, as SD's does);
   encoding once rather than every step saves a third of the diffusion stage;
3. ``diffusion``: UNet and text encoder together, from scratch, on latents
   from that pool: epsilon or v prediction (the scheduler config's
   ``prediction_type``) on the recipe's noise schedule (the built-in model's is
   SD's rescaled to zero terminal SNR), the x0 error weighted by
   min-SNR plus ``high_noise_weight``, captions dropped 10% of the time (for
   classifier-free guidance), an auxiliary loss that makes the text encoder
   keep every caption attribute readable (``text_attribute_weight``), an
   exponential moving average of the weights;
4. ``decoder`` (when the recipe has ``decoder_steps``): the VAE's decoder alone
   on the pool's latents against the images they encode, the encoder frozen,
   so the latents the UNet learned are unchanged and corners come out sharper;
5. ``refine`` (when the recipe has ``refine_steps``): UNet and text encoder
   again, from their EMA weights, on batches with more small shapes, each
   latent pixel's error weighted by how much of the shape it holds, so the
   few pixels that tell a small square from a small circle count.

A run finished without the optional stages (4 and 5) can be given them later:
the same command with the stage's fields set resumes it there.

Every random draw at step *n* comes from generators seeded by (seed, stage, n),
so a run is reproducible step by step and a resumed run continues exactly as an
uninterrupted one would. A checkpoint is written every few minutes, when the
time budget runs out and on Ctrl-C; running the same command again resumes.
At the end the EMA weights are written in the standard diffusers layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusiond.models import latent_rgb
from diffusiond.models.synthetic import WORDS, write_pipeline_files
from diffusiond.models.tokenizer_files import write_clip_tokenizer
from diffusiond.training import dataset, preview_projection
from diffusiond.training.recipe import OPTIONAL_STAGES, RECIPES, Recipe

log = logging.getLogger(__name__)

STAGES = ("vae", "latents", "diffusion", "decoder", "refine", "done")
_STAGE_SEED = {"vae": 1, "latents": 2, "diffusion": 3, "decoder": 4, "refine": 5}
CHECKPOINT = "checkpoint.pt"
LATENT_POOL = "latents.pt"
SERVING_DEFAULTS = "diffusiond.json"
CALIBRATION_PROMPTS = "calibration_prompts.txt"  # read by diffusiond.export.calibration
# What the text encoder's auxiliary heads read from a caption (see Recipe.text_attribute_weight).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(dataset.COLOURS), "background": tuple(dataset.COLOURS), "shape": dataset.SHAPES,
    "size": tuple(dataset.SIZES), "position": tuple(dataset.POSITIONS),
}


def stage_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator for every random draw of one step: a function of (seed, stage, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + _STAGE_SEED[stage]) * 10_000_019 + step)


def data_seed(seed: int, stage: str) -> int:
    return seed * 10 + _STAGE_SEED[stage]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], as SD's VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def learning_rate(peak: float, step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to ``floor`` times the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def crop_around_shape(scene: dataset.Scene, image: np.ndarray, size: int, g: torch.Generator) -> np.ndarray:
    """A ``size``-square crop that holds most of the shape and some background, at a random offset."""
    col, row = dataset.POSITIONS[scene.position]
    limit = image.shape[0] - size
    jitter = torch.randint(-size // 3, size // 3 + 1, (2,), generator=g).tolist()
    x0 = min(max(dataset.GRID_CENTRES[col] - size // 2 + jitter[0], 0), limit)
    y0 = min(max(dataset.GRID_CENTRES[row] - size // 2 + jitter[1], 0), limit)
    return image[y0 : y0 + size, x0 : x0 + size]


def alphas_cumprod(scheduler: dict[str, Any]) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler).alphas_cumprod.float()


def loss_target_and_weight(
    recipe: Recipe, latents: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the UNet must predict under the recipe's scheduler, and each row's loss weight."""
    return prediction_target_and_weight(recipe.scheduler.get("prediction_type", "epsilon"), latents, noise, ab,
                                        recipe.min_snr_gamma, recipe.high_noise_weight)


def prediction_target_and_weight(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor,
    min_snr_gamma: float, high_noise_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the UNet must predict, and each row's loss weight.

    The weight is set on the error of the implied clean latent x0 (min-SNR-gamma,
    plus ``high_noise_weight``) and converted to the parameterisation's own:
    an epsilon error is the x0 error times SNR, a v error times SNR + 1. At zero
    terminal SNR only v-prediction is defined, and min-SNR alone gives the last
    timestep no weight at all.
    """
    snr = (ab / (1 - ab)).flatten()
    x0_weight = snr.clamp(max=min_snr_gamma) + high_noise_weight
    if prediction_type == "epsilon":
        if bool((snr == 0).any()):
            raise ValueError("epsilon prediction is undefined at zero SNR; train v_prediction on such a schedule")
        return noise, x0_weight / snr
    if prediction_type == "v_prediction":
        return ab.sqrt() * noise - (1 - ab).sqrt() * latents, x0_weight / (snr + 1)
    raise ValueError(f"the scheduler has prediction_type {prediction_type!r}; train epsilon or v_prediction")


def shape_weight_map(coverage: torch.Tensor, latent_factor: int, shape_weight: float) -> torch.Tensor:
    """Each latent pixel's loss weight: 1 + ``shape_weight`` x how much of the shape it holds.

    ``coverage`` [B, 1, H, W] (image pixels, in [0, 1]) is average-pooled to the latent grid and dilated by
    one latent pixel, so the shape's edges and the background just outside them (where a corner is cut or
    kept) count as the shape.
    """
    shape = F.max_pool2d(F.avg_pool2d(coverage, latent_factor), 3, stride=1, padding=1)
    return 1.0 + shape_weight * shape


def pick_by_size(is_small: torch.Tensor, g: torch.Generator, count: int, small_fraction: float) -> torch.Tensor:
    """``count`` indices into a pool whose entries ``is_small`` marks, each small with probability
    ``small_fraction`` (uniformly, when the pool holds only one size)."""
    small, large = is_small.nonzero().flatten(), (~is_small).nonzero().flatten()
    if len(small) == 0 or len(large) == 0:
        return torch.randint(0, len(is_small), (count,), generator=g)
    want_small = torch.rand(count, generator=g) < small_fraction
    from_small = small[torch.randint(0, len(small), (count,), generator=g)]
    from_large = large[torch.randint(0, len(large), (count,), generator=g)]
    return torch.where(want_small, from_small, from_large)


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted mean squared error. ``pixel_weight`` ([B, 1, h, w]) weights latent pixels within a row,
    normalised to mean 1 per row, so each row's weight is still ``row_weight``'s (its timestep's) alone."""
    error = F.mse_loss(prediction, target, reduction="none")
    if pixel_weight is not None:
        error = error * (pixel_weight / pixel_weight.mean(dim=(2, 3), keepdim=True))
    return (row_weight.flatten() * error.mean(dim=(1, 2, 3))).mean()


@dataclass
class Clock:
    """Wall and CPU (user + sys, all threads) seconds spent training, summed over resumed runs."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __post_init__(self) -> None:
        self._wall0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()

    def lap(self) -> Clock:
        now_wall, now_cpu = time.perf_counter(), _cpu_seconds()
        self.wall_s += now_wall - self._wall0
        self.cpu_s += now_cpu - self._cpu0
        self._wall0, self._cpu0 = now_wall, now_cpu
        return self


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Trainer:
    """Owns the three networks, their optimisers and the checkpoint; ``run`` trains until done or out of time."""

    def __init__(
        self,
        recipe: Recipe,
        work_dir: Path,
        budget_s: float | None = None,
        checkpoint_every_s: float = 300.0,
        progress: bool = True,
        vae_from: Path | None = None,
    ) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        self.recipe = recipe
        self.work_dir = work_dir
        self.budget_s = budget_s
        self.checkpoint_every_s = checkpoint_every_s
        self.progress = progress
        work_dir.mkdir(parents=True, exist_ok=True)

        vocab = list(dict.fromkeys([*WORDS, *dataset.caption_words()]))
        tokens = write_clip_tokenizer(work_dir / "tokenizer", vocab, max_length=recipe.text["max_position_embeddings"])
        self.tokenizer = CLIPTokenizer.from_pretrained(work_dir / "tokenizer")
        bos, eos = tokens - 2, tokens - 1  # the tokenizer puts its special tokens last

        torch.manual_seed(recipe.seed)
        self.vae = AutoencoderKL(**recipe.vae)
        with torch.no_grad():  # posterior std starts near 0.05, not 1, so samples carry the mean from step 0
            self.vae.quant_conv.bias[recipe.vae["latent_channels"]:] = -6.0
        self.text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=tokens, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **recipe.text)
        )
        self.unet = UNet2DConditionModel(**recipe.unet)
        self.attribute_heads = torch.nn.ModuleDict({
            name: torch.nn.Linear(recipe.text["hidden_size"], len(values)) for name, values in ATTRIBUTE_VALUES.items()
        })
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
        self.decoder_params = [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]
        self.decoder_opt = torch.optim.AdamW(self.decoder_params, lr=recipe.decoder_lr, weight_decay=0.0)
        self.diffusion_params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        if recipe.text_attribute_weight:
            self.diffusion_params += list(self.attribute_heads.parameters())
        self.diffusion_opt = torch.optim.AdamW(self.diffusion_params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.ema = [p.detach().clone() for p in self.diffusion_params]
        self.alphas_cumprod = alphas_cumprod(recipe.scheduler)
        self.train_scenes = dataset.split("train")
        self._token_cache: dict[str, torch.Tensor] = {}

        self.stage = STAGES[0]
        self.step = 0
        self.vae_clock = (0.0, 0.0)  # wall and CPU seconds of stage 1, once it is done
        self.scaling_factor = 1.0
        self.clock = Clock()
        self.losses: dict[str, float] = {}
        self.pool: dict[str, torch.Tensor] | None = None
        self._is_small: torch.Tensor | None = None  # per latent-pool entry: is its shape small?
        if vae_from is not None and not self.checkpoint_path.is_file():
            self._take_vae(vae_from)
        self._load_checkpoint()

    # -- checkpoints -----------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def _load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        extends = self._extended_stage(state["recipe"])
        if state["recipe"] != self.recipe.fingerprint() and extends is None:
            raise SystemExit(
                f"{self.checkpoint_path} belongs to another recipe ({state['recipe']}, this is "
                f"{self.recipe.fingerprint()}); use another --work directory or delete it"
            )
        self.stage, self.step, self.scaling_factor = state["stage"], state["step"], state["scaling_factor"]
        self.vae.load_state_dict(state["vae"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.unet.load_state_dict(state["unet"])
        if "attribute_heads" in state:
            self.attribute_heads.load_state_dict(state["attribute_heads"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.diffusion_opt.load_state_dict(state["diffusion_opt"])
        for mine, saved in zip(self.ema, state["ema"]):
            mine.copy_(saved)
        self.clock = Clock(state["wall_s"], state["cpu_s"])
        self.vae_clock = (state["vae_wall_s"], state["vae_cpu_s"])
        self.losses = state.get("losses", {})
        if "decoder_opt" in state:
            self.decoder_opt.load_state_dict(state["decoder_opt"])
        if extends is not None and self.stage == "done":  # the same run, with optional stages added after it
            self.stage, self.step = extends, 0
            log.info("%s finished before the %s stage; going on into it", self.checkpoint_path, extends)
        log.info("resumed %s at stage %s, step %d", self.checkpoint_path, self.stage, self.step)

    def _extended_stage(self, saved: str) -> str | None:
        """The first optional stage this recipe adds to a run saved under fingerprint ``saved``, if any."""
        for stage in OPTIONAL_STAGES:
            if getattr(self.recipe, f"{stage}_steps") and saved == self.recipe.without_stages_from(stage).fingerprint():
                return stage
        return None

    def _take_vae(self, other_work_dir: Path) -> None:
        """Start from another run's finished autoencoder (same autoencoder recipe), skipping stage 1."""
        state = torch.load(other_work_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        if state.get("vae_recipe") != self.recipe.vae_fingerprint() or state["stage"] == "vae":
            raise SystemExit(f"{other_work_dir} holds no finished autoencoder of this recipe")
        self.vae.load_state_dict(state["vae"])
        self.clock = Clock(state["vae_wall_s"], state["vae_cpu_s"])
        self.vae_clock = (state["vae_wall_s"], state["vae_cpu_s"])
        self.stage, self.step = "latents", 0
        self.save_checkpoint()

    def save_checkpoint(self) -> None:
        self.clock.lap()
        state = {
            "recipe": self.recipe.fingerprint(),
            "vae_recipe": self.recipe.vae_fingerprint(),
            "vae_wall_s": self.vae_clock[0],
            "vae_cpu_s": self.vae_clock[1],
            "stage": self.stage,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "attribute_heads": self.attribute_heads.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "diffusion_opt": self.diffusion_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "ema": self.ema,
            "wall_s": self.clock.wall_s,
            "cpu_s": self.clock.cpu_s,
            "losses": self.losses,
        }
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.checkpoint_path)  # atomic: an interrupted save keeps the previous checkpoint

    # -- the loop ----------------------------------------------------------------

    def run(self) -> bool:
        """Train until every stage is done (True) or the time budget is spent (False, checkpointed)."""
        started = time.perf_counter()
        last_save = started
        try:
            while self.stage != "done":
                total = {"vae": self.recipe.vae_steps, "diffusion": self.recipe.diffusion_steps,
                         "decoder": self.recipe.decoder_steps, "refine": self.recipe.refine_steps}.get(self.stage)
                if total is None:  # the latents stage is one quick pass
                    self._measure_latents()
                    self._next_stage()
                    continue
                bar = self._bar(total)
                while self.step < total:
                    loss = {"vae": self._vae_step, "diffusion": self._diffusion_step,
                            "decoder": self._decoder_step, "refine": self._refine_step}[self.stage]()
                    self.step += 1
                    self.losses[self.stage] = loss
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    now = time.perf_counter()
                    if self.budget_s is not None and now - started >= self.budget_s and self.step < total:
                        if bar is not None:
                            bar.close()
                        self.save_checkpoint()
                        log.warning("time budget spent at %s step %d/%d; run again to resume",
                                    self.stage, self.step, total)
                        return False
                    if now - last_save >= self.checkpoint_every_s:
                        self.save_checkpoint()
                        last_save = now
                if bar is not None:
                    bar.close()
                self._next_stage()
        except KeyboardInterrupt:
            self.save_checkpoint()
            log.warning("interrupted at %s step %d; checkpoint saved, run again to resume", self.stage, self.step)
            raise
        self.save_checkpoint()
        return True

    def _next_stage(self) -> None:
        if self.stage == "vae":
            self.clock.lap()
            self.vae_clock = (self.clock.wall_s, self.clock.cpu_s)
        self.stage = STAGES[STAGES.index(self.stage) + 1]
        self.step = 0
        self.save_checkpoint()

    def _bar(self, total: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def _vae_step(self) -> float:
        r = self.recipe
        g = stage_generator(r.seed, "vae", self.step)
        crop = r.vae_crop if self.step < r.vae_crop_steps else 0
        images = []
        for index in range(self.step * r.vae_batch, (self.step + 1) * r.vae_batch):
            scene, image = dataset.sample(self.train_scenes, data_seed(r.seed, "vae"), index)
            images.append(crop_around_shape(scene, image, crop, g) if crop else image)
        x = to_tensor(np.stack(images))
        self.vae.train()
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=g)).sample
        loss = F.l1_loss(recon, x) + r.kl_weight * posterior.kl().mean()
        for group in self.vae_opt.param_groups:
            group["lr"] = learning_rate(r.vae_lr, self.step, r.vae_steps, r.vae_warmup_steps, r.final_lr_fraction)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return loss.item()

    @torch.no_grad()
    def _measure_latents(self) -> None:
        """Encode the latent pool and set the scaling factor; the pool is kept in the work directory."""
        r = self.recipe
        self.vae.eval()
        means, stds, scenes = [], [], []
        scene_index = {scene: i for i, scene in enumerate(self.train_scenes)}
        chunk = 64
        for start in range(0, r.latent_pool_size, chunk):
            count = min(chunk, r.latent_pool_size - start)
            picked, images = [], []
            for index in range(start, start + count):
                scene, image = dataset.sample(self.train_scenes, data_seed(r.seed, "latents"), index)
                picked.append(scene_index[scene])
                images.append(image)
            posterior = self.vae.encode(to_tensor(np.stack(images))).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            scenes.append(torch.tensor(picked, dtype=torch.int32))
        pool = {"mean": torch.cat(means), "std": torch.cat(stds), "scene": torch.cat(scenes)}
        g = stage_generator(r.seed, "latents", 0)
        sampled = pool["mean"] + pool["std"] * torch.randn(pool["mean"].shape, generator=g)
        self.scaling_factor = 1.0 / float(sampled.std())
        torch.save(pool, self.work_dir / LATENT_POOL)
        self.pool = pool
        log.info("encoded %d latents; std %.4f, scaling_factor %.5f",
                 r.latent_pool_size, 1 / self.scaling_factor, self.scaling_factor)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for caption in captions:
            ids = self._token_cache.get(caption)
            if ids is None:
                ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids[0]
                self._token_cache[caption] = ids
            rows.append(ids)
        return torch.stack(rows)

    def _pool(self) -> dict[str, torch.Tensor]:
        if self.pool is None:
            self.pool = torch.load(self.work_dir / LATENT_POOL, weights_only=True)
        return self.pool

    def _diffusion_step(self) -> float:
        r = self.recipe
        g = stage_generator(r.seed, "diffusion", self.step)
        picked = torch.randint(0, len(self._pool()["scene"]), (r.diffusion_batch,), generator=g)
        lr = learning_rate(r.lr, self.step, r.diffusion_steps, r.warmup_steps, r.final_lr_fraction)
        return self._denoising_step(g, picked, lr, pixel_weight=None)

    def _refine_step(self) -> float:
        """The diffusion step again, from the EMA weights, on more small shapes, the shape's pixels weighted up."""
        r = self.recipe
        g = stage_generator(r.seed, "refine", self.step)
        if self.step == 0:  # fine-tune the weights the diffusion stage would have shipped
            with torch.no_grad():
                for param, shadow in zip(self.diffusion_params, self.ema):
                    param.copy_(shadow)
        if self._is_small is None:
            self._is_small = torch.tensor([self.train_scenes[i].size == "small" for i in self._pool()["scene"].tolist()])
        picked = pick_by_size(self._is_small, g, r.refine_batch, r.refine_small_fraction)
        seed = data_seed(r.seed, "latents")
        coverage = torch.from_numpy(np.stack([
            dataset.sample_coverage(self.train_scenes, seed, i)[1] for i in picked.tolist()
        ])).unsqueeze(1)
        pixel_weight = shape_weight_map(coverage, 2 ** (len(r.vae["block_out_channels"]) - 1), r.refine_shape_weight)
        lr = learning_rate(r.refine_lr, self.step, r.refine_steps, r.vae_warmup_steps, r.final_lr_fraction)
        return self._denoising_step(g, picked, lr, pixel_weight)

    def _denoising_step(
        self, g: torch.Generator, picked: torch.Tensor, lr: float, pixel_weight: torch.Tensor | None
    ) -> float:
        """One optimiser step of UNet and text encoder on the latent-pool entries ``picked``
        (``pixel_weight``: see ``denoising_loss``)."""
        r = self.recipe
        pool = self._pool()
        mean, std = pool["mean"][picked], pool["std"][picked]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        scenes = [self.train_scenes[i] for i in pool["scene"][picked].tolist()]
        captions = [scene.caption for scene in scenes]
        batch = latents.shape[0]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        dropped = torch.rand(batch, generator=g) < r.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]

        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        self.unet.train()
        self.text_encoder.train()
        encoded = self.text_encoder(self.tokenize(captions))
        context = encoded[0]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        target, weight = loss_target_and_weight(r, latents, noise, ab)
        loss = denoising_loss(prediction, target, weight, pixel_weight)
        kept = [i for i, drop in enumerate(dropped.tolist()) if not drop]
        if r.text_attribute_weight and kept:
            pooled = encoded[1][kept]
            for name, values in ATTRIBUTE_VALUES.items():
                labels = torch.tensor([values.index(getattr(scenes[i], name)) for i in kept])
                loss = loss + r.text_attribute_weight * F.cross_entropy(self.attribute_heads[name](pooled), labels)

        for group in self.diffusion_opt.param_groups:
            group["lr"] = lr
        self.diffusion_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion_params, 1.0)
        self.diffusion_opt.step()
        decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for shadow, param in zip(self.ema, self.diffusion_params):
                shadow.lerp_(param.detach(), 1 - decay)
        return loss.item()

    def _decoder_step(self) -> float:
        """The decoder alone on the latent pool's samples, against the very images they were encoded from."""
        r = self.recipe
        g = stage_generator(r.seed, "decoder", self.step)
        pool = self._pool()
        picked = torch.randint(0, len(pool["scene"]), (r.decoder_batch,), generator=g)
        mean, std = pool["mean"][picked], pool["std"][picked]
        latents = mean + std * torch.randn(mean.shape, generator=g)
        seed = data_seed(r.seed, "latents")
        images = to_tensor(np.stack([dataset.sample(self.train_scenes, seed, i)[1] for i in picked.tolist()]))
        self.vae.train()
        loss = F.l1_loss(self.vae.decode(latents).sample, images)
        for group in self.decoder_opt.param_groups:
            group["lr"] = learning_rate(r.decoder_lr, self.step, r.decoder_steps, r.vae_warmup_steps,
                                        r.final_lr_fraction)
        self.decoder_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.decoder_opt.step()
        return loss.item()

    # -- the result -----------------------------------------------------------------

    def export(self, out: Path) -> None:
        """Write the model (EMA weights) in the standard diffusers layout, plus its serving defaults."""
        import shutil

        import diffusers

        r = self.recipe
        out.mkdir(parents=True, exist_ok=True)
        live = [p.detach().clone() for p in self.diffusion_params]
        with torch.no_grad():
            for param, shadow in zip(self.diffusion_params, self.ema):
                param.copy_(shadow)
        try:
            self.text_encoder.save_pretrained(out / "text_encoder")
            self.unet.save_pretrained(out / "unet")
        finally:
            with torch.no_grad():
                for param, value in zip(self.diffusion_params, live):
                    param.copy_(value)
        self.vae.register_to_config(scaling_factor=round(self.scaling_factor, 5))
        self.vae.save_pretrained(out / "vae")
        shutil.copytree(self.work_dir / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        scheduler = {**r.scheduler, "_class_name": r.default_scheduler_class}
        write_pipeline_files(out, scheduler)
        defaults = {"default_steps": r.default_steps, "default_guidance_scale": r.default_guidance_scale}
        (out / SERVING_DEFAULTS).write_text(json.dumps(defaults, indent=2) + "\n")
        self.latent_projection().write(out / latent_rgb.MODEL_FILE)
        # INT8 export calibrates on prompts the model knows: the validation split (never the held-out test).
        captions = [scene.caption for scene in dataset.split("validation")]
        (out / CALIBRATION_PROMPTS).write_text("\n".join(captions) + "\n")
        # APPROX_RGB previews' projection, fitted to this VAE (SD's factors draw nonsense for it).
        with torch.no_grad():
            projection = preview_projection.fit_vae(
                self.vae, preview_projection.training_renders(), preview_projection.source_label()
            )
        projection.write(out / latent_rgb.MODEL_FILE)
        self.clock.lap()
        record = {
            "recipe": r.as_dict(),
            "recipe_fingerprint": r.fingerprint(),
            "stage": self.stage,
            "final_losses": self.losses,
            "train_wall_s": round(self.clock.wall_s, 1),
            "train_cpu_s": round(self.clock.cpu_s, 1),
            "vae_stage_wall_s": round(self.vae_clock[0], 1),
            "vae_stage_cpu_s": round(self.vae_clock[1], 1),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(),
        }
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


    @torch.no_grad()
    def latent_projection(self, count: int = 64) -> latent_rgb.LatentRGB:
        """APPROX_RGB previews' projection, fitted by least squares to this VAE's decodes of training images."""
        images = [dataset.sample(self.train_scenes, data_seed(self.recipe.seed, "latents"), -1 - i)[1]
                  for i in range(count)]
        self.vae.eval()
        levels = len(self.recipe.vae["block_out_channels"]) - 1
        return latent_rgb.fit(
            lambda x: self.vae.encode(x).latent_dist.mean, lambda z: self.vae.decode(z).sample,
            self.scaling_factor, 2**levels, self.recipe.vae["latent_channels"],
            source="fitted at export to the VAE's decodes of training images", images=to_tensor(np.stack(images)),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusiond.training.train",
        description="Train the built-in model on the shapes data set (resumable: run again to continue).",
    )
    parser.add_argument("--work", required=True, help="directory for the checkpoint and tokenizer")
    parser.add_argument("--out", required=True, help="where to write the trained model (diffusers layout)")
    parser.add_argument("--recipe", default="builtin", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop (with a checkpoint) after this many minutes of this run")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a recipe field, e.g. --set diffusion_steps=500 (changes the fingerprint)")
    parser.add_argument("--vae-from", default=None, metavar="WORK",
                        help="start from the finished autoencoder of another run with the same autoencoder recipe")
    parser.add_argument("--export-now", action="store_true",
                        help="write --out from the checkpoint as it is, without training")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.recipe]
    changes: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in recipe.as_dict():
            parser.error(f"--set: the recipe has no field {key!r}")
        changes[key] = json.loads(value)
    if args.seed is not None:
        changes["seed"] = args.seed
    recipe = recipe.replace(**changes)

    trainer = Trainer(
        recipe,
        Path(args.work),
        budget_s=None if args.budget_minutes is None else args.budget_minutes * 60,
        checkpoint_every_s=args.checkpoint_minutes * 60,
        progress=not args.no_progress,
        vae_from=None if args.vae_from is None else Path(args.vae_from),
    )
    if not args.export_now:
        try:
            finished = trainer.run()
        except KeyboardInterrupt:
            return 130
        if not finished:
            return 3
    trainer.export(Path(args.out))
    log.info("wrote %s (stage %s; %.0f s wall, %.0f s CPU in training)",
             args.out, trainer.stage, trainer.clock.wall_s, trainer.clock.cpu_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
