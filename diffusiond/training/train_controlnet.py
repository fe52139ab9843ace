"""Train a canny-edge ControlNet for a model on the shapes data set, on a CPU, resumably.

    python -m diffusiond.training.train_controlnet --work runs/controlnet \\
        --out diffusiond/models/builtin_controlnet --budget-minutes 20

The ControlNet starts as a copy of the base UNet's encoder (diffusers'
``ControlNetModel.from_unet``) with zero-initialised output convolutions, so at
step 0 it changes nothing and training only has to learn how the edges move
the denoiser. The UNet, text encoder and autoencoder stay frozen, and by
default so does the copied encoder: only the conditioning embedding and the
zero convolutions learn (see ``ControlRecipe``; BENCHMARKS.md says why). Each step
draws fresh training scenes, renders them, and conditions on
``diffusiond.models.canny.canny`` of the rendered image (the same function the
server applies to ``canny_from`` images). Captions are dropped a fraction of
the time so the ControlNet also works on the unconditional half of
classifier-free guidance.

Every random draw at step *n* comes from a generator seeded by (seed, n), so a
resumed run continues exactly as an uninterrupted one; a checkpoint is written
every few minutes, when the budget runs out and on Ctrl-C. ``--budget-minutes``
stops training early and still writes ``--out`` from what was learnt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffusiond.models.builtin import builtin_model_dir
from diffusiond.models.canny import DEFAULT_HIGH, DEFAULT_LOW, canny
from diffusiond.training import dataset
from diffusiond.training.loop import run_steps
from diffusiond.training.train import (
    Clock,
    alphas_cumprod,
    denoising_loss,
    learning_rate,
    pick_by_size,
    prediction_target_and_weight,
    shape_weight_map,
    to_tensor,
)

log = logging.getLogger(__name__)

CHECKPOINT = "controlnet_checkpoint.pt"
POOL = "controlnet_pool.pt"
POOL_KEYS = {"captions", "mean", "std", "edges", "coverage", "small"}
CONTROL_CONFIG = "diffusiond_control.json"  # read by the server: what the control image is


@dataclass(frozen=True)
class ControlRecipe:
    seed: int = 0
    steps: int = 1000
    batch: int = 16
    pool_size: int = 1024  # scenes drawn, encoded and edge-mapped once (the denoiser, not the data, is the cost)
    lr: float = 5e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    caption_dropout: float = 0.3
    min_snr_gamma: float = 5.0
    high_noise_weight: float = 1.0  # as the built-in recipe's: the noisiest timesteps are where the layout forms
    # The conditioning embedding runs at full image size, so it is thin; None: one stride-2 stage per
    # halving of the VAE's factor, so the edges arrive at the latent's size (factor 4: (8, 16, 16)).
    conditioning_channels: tuple[int, ...] | None = None
    # Where the layout forms: this fraction of examples draws its timestep from the noisier half.
    high_noise_fraction: float = 0.5
    # As the built-in recipe's refine stage: the error over the shape weighted up (1 + shape_weight x its
    # coverage on the latent grid) and small shapes drawn small_fraction of the time (None: as the pool has
    # them, half). On the uniform loss, the built-in model's ControlNet drew small squares and triangles
    # rounder than the model alone did.
    shape_weight: float = 8.0
    small_fraction: float | None = 0.75
    # The conditioning embedding's last convolution starts small and random instead of zero, so the
    # edges reach the ControlNet's trunk from step 0 and the zero convolutions at its outputs learn
    # from them at once (with both at zero, the embedding gets no gradient until the outputs move).
    embedding_init_std: float = 0.1
    # Train the ControlNet's copy of the UNet encoder too (ControlNet's recipe), or keep it as copied and
    # train only the conditioning embedding and the zero convolutions: fewer gradients per step, and a
    # high learning rate stays safe, which is what a CPU budget of minutes needs.
    train_trunk: bool = False
    canny_low: float = DEFAULT_LOW
    canny_high: float = DEFAULT_HIGH

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of a thin conditioning embedding that downsamples a control image by ``vae_scale_factor``."""
    halvings = vae_scale_factor.bit_length() - 1
    if vae_scale_factor < 1 or 2 ** halvings != vae_scale_factor:
        raise ValueError(f"the VAE's scale factor must be a power of two, not {vae_scale_factor}")
    return (8, *([16] * halvings))


def control_tensor(images: np.ndarray, low: float, high: float) -> torch.Tensor:
    """uint8 [B, H, W, 3] scenes -> their canny maps as float [B, 3, H, W] in [0, 1] (diffusers' control range)."""
    edges = np.stack([canny(image, low, high) for image in images])
    return torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255.0


class ControlTrainer:
    """Owns the frozen base model, the ControlNet, its optimiser and checkpoint."""

    def __init__(self, recipe: ControlRecipe, model_dir: Path, work_dir: Path, budget_s: float | None,
                 checkpoint_every_s: float = 300.0, progress: bool = True) -> None:
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.recipe, self.model_dir, self.work_dir = recipe, model_dir, work_dir
        self.budget_s, self.checkpoint_every_s, self.progress = budget_s, checkpoint_every_s, progress
        work_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval().requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval().requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval().requires_grad_(False)
        torch.manual_seed(recipe.seed)
        channels = recipe.conditioning_channels or conditioning_channels_for(
            2 ** (len(self.vae.config.block_out_channels) - 1))
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=channels)
        if recipe.embedding_init_std:
            with torch.no_grad():
                self.controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, recipe.embedding_init_std)
        if not recipe.train_trunk:
            self.controlnet.requires_grad_(False)
            for module in (self.controlnet.controlnet_cond_embedding, self.controlnet.controlnet_down_blocks,
                           self.controlnet.controlnet_mid_block):
                module.requires_grad_(True)
        self.params = [p for p in self.controlnet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=recipe.lr, weight_decay=0.0)
        scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        self.alphas_cumprod = alphas_cumprod(scheduler)
        self.prediction_type = scheduler.get("prediction_type", "epsilon")
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.scenes = dataset.split("train")
        self.step = 0
        self.loss = float("nan")
        self.clock = Clock()
        self._contexts: dict[str, torch.Tensor] = {}
        self._load_checkpoint()
        self.pool = self._load_pool()

    @torch.no_grad()
    def _load_pool(self) -> dict:
        """Training examples, made once: each scene's caption, latent posterior (mean, std), canny map, the
        shape's coverage (uint8 [N, 1, 64, 64]) and whether it is small."""
        path = self.work_dir / POOL
        if path.is_file():
            pool = torch.load(path, weights_only=False)
            if POOL_KEYS <= pool.keys():
                return pool
            log.info("%s lacks %s (made by an earlier version); making it again", path,
                     ", ".join(sorted(POOL_KEYS - pool.keys())))
        r = self.recipe
        seed = r.seed * 10 + 7
        captions, means, stds, edges = [], [], [], []
        for start in range(0, r.pool_size, 64):
            count = min(64, r.pool_size - start)
            batch_captions, images = dataset.batch(self.scenes, seed, start, count)
            posterior = self.vae.encode(to_tensor(images)).latent_dist
            captions += batch_captions
            means.append(posterior.mean)
            stds.append(posterior.std)
            edges.append(control_tensor(images, r.canny_low, r.canny_high)[:, :1].bool())
        shapes = [dataset.sample_coverage(self.scenes, seed, i) for i in range(r.pool_size)]
        coverage = torch.from_numpy(np.stack([c for _, c in shapes]) * 255).round().to(torch.uint8).unsqueeze(1)
        pool = {"captions": captions, "mean": torch.cat(means), "std": torch.cat(stds), "edges": torch.cat(edges),
                "coverage": coverage, "small": torch.tensor([scene.size == "small" for scene, _ in shapes])}
        torch.save(pool, path)
        log.info("made a pool of %d examples in %s", r.pool_size, path)
        return pool

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def _load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if state["recipe"] != self.recipe.fingerprint():
            raise SystemExit(f"{self.checkpoint_path} belongs to another recipe; use another --work or delete it")
        self.controlnet.load_state_dict(state["controlnet"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.loss = state["step"], state["loss"]
        self.clock = Clock(state["wall_s"], state["cpu_s"])
        log.info("resumed %s at step %d", self.checkpoint_path, self.step)

    def save_checkpoint(self) -> None:
        self.clock.lap()
        state = {
            "recipe": self.recipe.fingerprint(), "step": self.step, "loss": self.loss,
            "controlnet": self.controlnet.state_dict(), "opt": self.opt.state_dict(),
            "wall_s": self.clock.wall_s, "cpu_s": self.clock.cpu_s,
        }
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.checkpoint_path)

    def run(self) -> bool:
        """Train until ``steps`` (True) or until the budget is spent (False, checkpointed)."""
        return run_steps(self, self._step, self.recipe.steps, desc="controlnet", budget_s=self.budget_s,
                         checkpoint_every_s=self.checkpoint_every_s, progress=self.progress)

    def _context(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._contexts]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                for caption, row in zip(missing, self.text_encoder(ids)[0]):
                    self._contexts[caption] = row
        return torch.stack([self._contexts[c] for c in captions])

    def _step(self) -> float:
        r = self.recipe
        g = torch.Generator().manual_seed(r.seed * 1_000_003 + 7 * 10_000_019 + self.step)
        if r.small_fraction is None:
            picked = torch.randint(0, len(self.pool["captions"]), (r.batch,), generator=g)
        else:
            picked = pick_by_size(self.pool["small"], g, r.batch, r.small_fraction)
        captions = [self.pool["captions"][i] for i in picked.tolist()]
        cond = self.pool["edges"][picked].float().expand(-1, 3, -1, -1)
        mean, std = self.pool["mean"][picked], self.pool["std"][picked]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        dropped = torch.rand(r.batch, generator=g) < r.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        context = self._context(captions)
        steps = len(self.alphas_cumprod)
        timesteps = torch.randint(0, steps, (r.batch,), generator=g)
        noisier = torch.rand(r.batch, generator=g) < r.high_noise_fraction
        timesteps = torch.where(noisier, torch.randint(steps // 2, steps, (r.batch,), generator=g), timesteps)
        noise = torch.randn(latents.shape, generator=g)
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise

        self.controlnet.train()
        down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=cond,
                                    return_dict=False)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context,
                               down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        target, weight = prediction_target_and_weight(self.prediction_type, latents, noise, ab, r.min_snr_gamma,
                                                      r.high_noise_weight)
        pixel_weight = None
        if r.shape_weight:
            coverage = self.pool["coverage"][picked].float() / 255.0
            pixel_weight = shape_weight_map(coverage, coverage.shape[-1] // latents.shape[-1], r.shape_weight)
        loss = denoising_loss(prediction, target, weight, pixel_weight)
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(r.lr, self.step, r.steps, r.warmup_steps, r.final_lr_fraction)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()

    def export(self, out: Path, command: str) -> None:
        """Write the ControlNet in diffusers format (fp16 safetensors, to ship small) and what it expects."""
        import diffusers

        out.mkdir(parents=True, exist_ok=True)
        self.controlnet.to(torch.float16).save_pretrained(out)
        self.controlnet.to(torch.float32)
        r = self.recipe
        control = {"conditioning": "canny", "canny_low": r.canny_low, "canny_high": r.canny_high,
                   "base_model": "builtin" if self.model_dir == builtin_model_dir() else str(self.model_dir)}
        (out / CONTROL_CONFIG).write_text(json.dumps(control, indent=2) + "\n")
        self.clock.lap()
        record = {
            "recipe": asdict(r), "command": command, "steps_done": self.step, "final_loss": self.loss,
            "train_wall_s": round(self.clock.wall_s, 1), "train_cpu_s": round(self.clock.cpu_s, 1),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
        }
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusiond.training.train_controlnet",
        description="Train a canny ControlNet for a model on the shapes data set (resumable: run again to continue).",
    )
    parser.add_argument("--work", required=True, help="directory for the checkpoint")
    parser.add_argument("--out", required=True, help="where to write the ControlNet (diffusers layout)")
    parser.add_argument("--model", default=None, help="base model directory (default: the built-in model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=ControlRecipe.steps)
    parser.add_argument("--batch-size", type=int, default=ControlRecipe.batch)
    parser.add_argument("--lr", type=float, default=ControlRecipe.lr)
    parser.add_argument("--train-trunk", action="store_true",
                        help="also train the ControlNet's copy of the UNet encoder (default: only its embedding and "
                        "zero convolutions)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop after this many minutes of this run and write --out from what was learnt")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, more threads wait on each other)")
    parser.add_argument("--export-now", action="store_true", help="write --out from the checkpoint, without training")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    recipe = ControlRecipe(seed=args.seed, steps=args.steps, batch=args.batch_size, lr=args.lr,
                           train_trunk=args.train_trunk)
    trainer = ControlTrainer(
        recipe, Path(args.model) if args.model else builtin_model_dir(), Path(args.work),
        budget_s=None if args.budget_minutes is None else args.budget_minutes * 60,
        checkpoint_every_s=args.checkpoint_minutes * 60, progress=not args.no_progress,
    )
    if not args.export_now:
        try:
            trainer.run()
        except KeyboardInterrupt:
            return 130
    command = "python -m diffusiond.training.train_controlnet " + " ".join(sys.argv[1:] if argv is None else argv)
    trainer.export(Path(args.out), command)
    log.info("wrote %s (step %d/%d; %.0f s wall, %.0f s CPU in training)",
             args.out, trainer.step, recipe.steps, trainer.clock.wall_s, trainer.clock.cpu_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
