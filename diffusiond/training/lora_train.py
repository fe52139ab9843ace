"""``diffusiond train-lora``: train a LoRA adapter for a model's UNet on a folder of captioned images.

    diffusiond train-lora --model builtin --images DIR --rank 4 --steps 1000 --lr 1e-4 --batch-size 4 \\
        --out adapters/mystyle.safetensors [--work runs/mystyle] [--seed 0] [--budget-minutes 15]

Images are any files PIL opens; each one's caption is the ``.txt`` file
beside it (same name), or empty. They are resized to the model's native size,
encoded once by the model's VAE (posterior mean and standard deviation, so
every use draws a fresh sample) and their captions once by its text encoder;
then only the UNet runs, with the LoRA layers (``LoraLinear``, ``LoraConv``:
the layer's output plus ``alpha / rank * up(down(x))``, ``up`` starting at
zero so training starts from the base model) wrapped around its attention
projections, feed-forward layers and, with ``--targets all`` (the default),
its ResNet convolutions too. The loss is the base model's own objective
(epsilon or v prediction, from its scheduler config) at uniformly drawn
timesteps. Only the LoRA weights train; nothing of the base model changes.

Seeded: every draw of step *n* comes from a generator seeded by (seed, n), so
a resumed run equals an uninterrupted one. A checkpoint (LoRA weights,
optimiser, step, wall time) goes to ``--work`` every few minutes, when
``--budget-minutes`` runs out and on Ctrl-C; the same command resumes it.
The adapter is written in the PEFT form (``models.lora.save_adapter``) with
the base model's name and hash in its metadata, and the server loads it from
``--lora-dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusiond.models.lora import LoraLayer, save_adapter
from diffusiond.training.loop import run_steps

log = logging.getLogger(__name__)

CHECKPOINT = "lora_checkpoint.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
RESNET_TARGETS = ("conv1", "conv2")


@dataclass(frozen=True)
class LoraTrainSettings:
    model: str  # a diffusers-format model directory
    images: str
    out: str
    rank: int = 4
    alpha: float = 0.0  # 0: the rank (updates at scale 1 as trained)
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    targets: str = "all"  # "attention": attention and feed-forward layers; "all": also the ResNet convolutions
    weight_decay: float = 0.0
    base_model: str = ""  # the name recorded in the adapter (default: the model directory's name)

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (everything but where the result goes)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("out",)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if self.targets not in ("attention", "all"):
            raise ValueError(f"targets must be attention or all, got {self.targets!r}")


class LoraLinear(torch.nn.Module):
    """``base(x) + factor * up(down(x))`` around a frozen linear layer (or a 1x1 convolution used as one)."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        conv = isinstance(base, torch.nn.Conv2d)
        fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1] if conv else base.in_features
        out = base.out_channels if conv else base.out_features
        down_shape = (rank, base.in_channels, *base.kernel_size) if conv else (rank, fan_in)
        up_shape = (out, rank, 1, 1) if conv else (out, rank)
        bound = 1 / math.sqrt(fan_in)  # PEFT's kaiming-uniform(a=sqrt(5)) initialisation of lora_A
        self.down = torch.nn.Parameter(torch.empty(down_shape).uniform_(-bound, bound, generator=generator))
        self.up = torch.nn.Parameter(torch.zeros(up_shape))
        self.factor = alpha / rank
        self.conv = conv

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003 - the base's extras
        out = self.base(x, *args, **kwargs)
        if self.conv:
            b = self.base
            low = F.conv2d(x, self.down, None, b.stride, b.padding, b.dilation)
            return out + self.factor * F.conv2d(low, self.up)
        return out + self.factor * F.linear(F.linear(x, self.down), self.up)


def add_lora_layers(unet: torch.nn.Module, rank: int, alpha: float, targets: str, seed: int) -> dict[str, LoraLinear]:
    """Wrap the UNet's target layers (fixed order: module names sorted) in LoRA layers; returns them by name."""
    suffixes = ATTENTION_TARGETS + (RESNET_TARGETS if targets == "all" else ())
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    wrapped: dict[str, LoraLinear] = {}
    for name in sorted(modules):
        module = modules[name]
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(suffixes):
            continue
        if ".attentions." not in name and not name.startswith("mid_block.attentions") and ".resnets." not in name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        layer = LoraLinear(module, rank, alpha, generator)
        setattr(modules[parent_name], leaf, layer)
        wrapped[name] = layer
    return wrapped


def read_images(directory: Path, size: int) -> tuple[list[str], torch.Tensor]:
    """Captions and images [N, 3, size, size] in [-1, 1] from ``directory`` (captions from NAME.txt)."""
    from PIL import Image

    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    captions, images = [], []
    for path in files:
        caption_file = path.with_suffix(".txt")
        captions.append(caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else "")
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return captions, torch.stack(images)


class LoraTrainer:
    def __init__(self, settings: LoraTrainSettings, work_dir: Path, progress: bool = True,
                 checkpoint_every_s: float = 300.0) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusiond.models.config import load_model_config

        self.settings = s = settings
        self.work_dir = work_dir
        self.progress = progress
        self.checkpoint_every_s = checkpoint_every_s
        model_dir = Path(s.model)
        config = load_model_config(model_dir)
        torch.manual_seed(s.seed)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval().requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        scheduler = DDPMScheduler.from_config(config.scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.scaling_factor = config.scaling_factor

        captions, images = read_images(Path(s.images), config.default_size)
        with torch.no_grad():
            posterior = torch.cat([vae.encode(images[i:i + 32]).latent_dist.mean for i in range(0, len(images), 32)])
            logvar = torch.cat([vae.encode(images[i:i + 32]).latent_dist.logvar for i in range(0, len(images), 32)])
            distinct = sorted(set(captions))
            ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            encoded = text_encoder(ids)[0]
        self.mean, self.std = posterior, torch.exp(0.5 * logvar)
        self.contexts = encoded[[distinct.index(c) for c in captions]]
        log.info("%d images, %d distinct captions, latents %s", len(captions), len(distinct), list(posterior.shape[1:]))
        del vae, text_encoder

        alpha = s.alpha or float(s.rank)
        self.alpha = alpha
        self.layers = add_lora_layers(self.unet, s.rank, alpha, s.targets, s.seed)
        self.params = [p for layer in self.layers.values() for p in (layer.down, layer.up)]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.step = 0
        self.wall_s = 0.0
        self.loss = float("nan")
        self._resume()

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, weights_only=False)
        if state["fingerprint"] != self.settings.fingerprint():
            raise ValueError(f"{self.checkpoint_path} is from a run with other settings; use another --work "
                             "or delete it")
        for name, layer in self.layers.items():
            layer.down.data.copy_(state["lora"][name]["down"])
            layer.up.data.copy_(state["lora"][name]["up"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.wall_s = state["step"], state["wall_s"]
        log.info("resumed %s at step %d (%.1f minutes trained)", self.checkpoint_path, self.step, self.wall_s / 60)

    def save_checkpoint(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.settings.fingerprint(),
            "lora": {name: {"down": layer.down.detach().clone(), "up": layer.up.detach().clone()}
                     for name, layer in self.layers.items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "wall_s": self.wall_s,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def train_step(self) -> float:
        s = self.settings
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
        picked = torch.randint(0, len(self.mean), (s.batch_size,), generator=g)
        mean, std = self.mean[picked], self.std[picked]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        timesteps = torch.randint(0, len(self.alphas_cumprod), (s.batch_size,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * latents
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=self.contexts[picked]).sample
        loss = F.mse_loss(prediction, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()

    def run(self, budget_s: float | None = None) -> bool:
        """Train to ``steps`` (True) or until ``budget_s`` of this run is spent (False, checkpointed)."""
        wall_before = self.wall_s

        def count_wall(elapsed_s: float) -> None:
            self.wall_s = wall_before + elapsed_s

        return run_steps(self, self.train_step, self.settings.steps, desc="lora", budget_s=budget_s,
                         checkpoint_every_s=self.checkpoint_every_s, progress=self.progress, on_step=count_wall)

    def lora_layers(self) -> list[LoraLayer]:
        return [LoraLayer(name, layer.down.detach().clone(), layer.up.detach().clone(), layer.factor)
                for name, layer in self.layers.items()]

    def export(self, out: Path, dtype: torch.dtype = torch.float32) -> None:
        s = self.settings
        layers = [LoraLayer(layer.module, layer.down.to(dtype), layer.up.to(dtype), layer.factor)
                  for layer in self.lora_layers()]
        metadata = {
            "base_model": s.base_model or Path(s.model).resolve().name,
            "diffusiond.training": json.dumps({**asdict(self.settings), "steps_done": self.step,
                                               "wall_minutes": round(self.wall_s / 60, 2),
                                               "final_loss": round(self.loss, 5)}),
        }
        save_adapter(out, layers, s.rank, self.alpha, metadata)
        log.info("wrote %s (%d layers, rank %d, %.0f kB) after %d steps, %.1f minutes", out, len(layers), s.rank,
                 out.stat().st_size / 1e3, self.step, self.wall_s / 60)
