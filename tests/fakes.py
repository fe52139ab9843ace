"""A scripted backend: cheap, exact stand-ins for the networks, so pipeline and batcher tests run in milliseconds.

Every network is a row-wise function of its own inputs (no mixing across the
batch, no kernel-size-dependent rounding), so a request's images are
bit-identical whatever company it keeps: any difference a test sees is the
pipeline's or the batcher's doing. The backend records every UNet call and can
hold a call, run out of memory, or fail the way a test scripts it.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusiond.errors import OutOfMemory
from diffusiond.models.config import ModelConfig
from diffusiond.pipeline.schedulers import SchedulerFactory
from diffusiond.pipeline.text import PromptEncoder
from diffusiond.pipeline.text2img import Text2ImagePipeline
from diffusiond.service.limits import ModelLimits
from diffusiond.service.models import LoadedModel

HIDDEN = 8
MAX_TOKENS = 8
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
CONFIG = ModelConfig(
    latent_channels=4,
    vae_scale_factor=8,
    scaling_factor=0.5,
    unet_sample_size=8,
    text_hidden_size=HIDDEN,
    text_max_length=MAX_TOKENS,
    prediction_type="epsilon",
    scheduler_config=SCHEDULER_CONFIG,
    pipeline_class="StableDiffusionPipeline",
)


class WordTokenizer:
    """Words -> stable ids; pads and truncates like a CLIP tokenizer called by diffusers."""

    @dataclass
    class Encoded:
        input_ids: object

    def __call__(self, text: str, padding=None, max_length=None, truncation=True, return_tensors=None):
        ids = [1] + [2 + zlib.crc32(w.encode()) % 997 for w in text.split()] + [3]
        if max_length is not None and truncation:
            ids = ids[:max_length]
        if padding == "max_length":
            ids = ids + [0] * (max_length - len(ids))
        return self.Encoded(torch.tensor([ids]) if return_tensors == "pt" else ids)


@dataclass
class UNetCall:
    rows: int
    timesteps: list[float]
    size: tuple[int, int] = (0, 0)  # latent height, width
    controlnet: str = ""  # the ControlNet the call ran ("" none)
    control_scales: list[float] | None = None


class ScriptedBackend:
    name = "scripted"
    dtype_name = "fp32"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.calls: list[UNetCall] = []
        self.decodes: list[int] = []
        self.before_unet: Callable[[int], None] | None = None  # called with the call's number (1-based)
        self.unet_fails: Callable[[torch.Tensor, torch.Tensor], BaseException | None] | None = None
        self._lock = threading.Lock()

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.float()
        scale = torch.arange(1, HIDDEN + 1, dtype=torch.float32) / HIDDEN
        return torch.sin(ids[..., None] * scale / 100.0)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        with self._lock:
            number = len(self.calls) + 1
        if self.before_unet is not None:
            self.before_unet(number)
        if self.unet_fails is not None:
            error = self.unet_fails(sample, encoder_hidden_states)
            if error is not None:
                raise error
        with self._lock:
            self.calls.append(UNetCall(sample.shape[0], [float(t) for t in timestep], tuple(sample.shape[2:])))
        context = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        t = timestep.float()[:, None, None, None]
        return 0.3 * sample + 0.2 * torch.cos(t / 300.0) + context

    # ControlNets: a scripted one adds (mean of its control image) x scale to each row's output.
    def attach_controlnet(self, name, path) -> None:
        self.controlnets = (*getattr(self, "controlnets", ()), name)

    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(getattr(self, "controlnets", ()))

    def unet_controlled(self, sample, timestep, encoder_hidden_states, control) -> torch.Tensor:
        out = self.unet(sample, timestep, encoder_hidden_states)
        with self._lock:
            self.calls[-1].controlnet = control.name
            self.calls[-1].control_scales = [float(s) for s in control.scale]
        return out + control.image.mean(dim=(1, 2, 3))[:, None, None, None] * control.scale[:, None, None, None]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.decodes.append(latents.shape[0])
        rgb = torch.tanh(latents[:, :3])
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([small, small[:, :1]], dim=1)

    def close(self) -> None:
        pass


def out_of_memory_when(rule: Callable[[torch.Tensor, torch.Tensor], bool]):
    """A ``unet_fails`` script: OutOfMemory whenever ``rule(sample, context)`` holds."""
    return lambda sample, context: OutOfMemory("out of memory (scripted)") if rule(sample, context) else None


def scripted_model(name: str = "scripted") -> LoadedModel:
    backend = ScriptedBackend()
    prompts = PromptEncoder(WordTokenizer(), backend, MAX_TOKENS, cache_size=16)
    pipeline = Text2ImagePipeline(backend, prompts, SchedulerFactory(SCHEDULER_CONFIG), CONFIG)
    limits = ModelLimits.for_model(CONFIG, max_size=256)
    return LoadedModel(name, "scripted", CONFIG, backend, pipeline, limits)
