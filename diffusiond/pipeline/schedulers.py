"""Schedulers by name, built from the model's own scheduler config.

Every request gets a fresh scheduler instance: multistep schedulers (DPM++,
UniPC, PNDM) keep state between steps, so an instance is never shared between
requests, also not between requests in one batch.

A model trained on a schedule rescaled to zero terminal SNR
(``rescale_betas_zero_snr`` in its scheduler config, as the built-in model is)
is only offered the schedulers that can rescale their betas the same way: the
others would sample on a noise schedule the model never saw.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import diffusers

from diffusiond.errors import NotFound, shown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", {}, "DDIM (eta 0, deterministic)"),
    "ddpm": SchedulerSpec("DDPMScheduler", {}, "DDPM (ancestral; needs many steps)"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}, "PNDM/PLMS (SD 1.x default)"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": False}, "linear multistep"),
    "lms_karras": SchedulerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS, Karras sigmas"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "euler_karras": SchedulerSpec("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler, Karras sigmas"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", {}, "Euler ancestral (stochastic)"),
    "dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M, Karras sigmas",
    ),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", {}, "UniPC"),
}

ALIASES = {
    "euler_ancestral": "euler_a",
    "dpm++_2m": "dpmpp_2m",
    "dpm++_2m_karras": "dpmpp_2m_karras",
    "plms": "pndm",
}

# Config keys that belong to one scheduler class and would leak into another
# when a model's config (e.g. SD 1.5's PNDM) seeds a different class.
_CLASS_SPECIFIC_KEYS = ("skip_prk_steps", "use_karras_sigmas", "algorithm_type", "solver_order")


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def default_scheduler_name(scheduler_config: dict[str, Any]) -> str:
    """The scheduler name matching the model's own config, e.g. PNDMScheduler -> "pndm"."""
    class_name = scheduler_config.get("_class_name", "")
    karras = bool(scheduler_config.get("use_karras_sigmas", False))
    for name, spec in SCHEDULERS.items():
        if spec.class_name == class_name and bool(spec.overrides.get("use_karras_sigmas", False)) == karras:
            return name
    log.warning("model scheduler %r is not one diffusiond names; defaulting to dpmpp_2m", class_name)
    return "dpmpp_2m"


def supports_zero_terminal_snr(cls: type) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


class SchedulerFactory:
    """Creates per-request scheduler instances for one model."""

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        base = {k: v for k, v in scheduler_config.items() if k not in _CLASS_SPECIFIC_KEYS}
        self.default_name = default_scheduler_name(scheduler_config)
        self._templates: dict[str, Any] = {}
        self._unsupported: dict[str, str] = {}  # name -> why this model cannot use it
        zero_snr = bool(scheduler_config.get("rescale_betas_zero_snr", False))
        for name, spec in SCHEDULERS.items():
            cls = getattr(diffusers, spec.class_name)
            if zero_snr and not supports_zero_terminal_snr(cls):
                self._unsupported[name] = (
                    f"{spec.class_name} cannot rescale its noise schedule to zero terminal SNR, which this model "
                    "was trained on")
                continue
            config = dict(base)
            if spec.class_name == scheduler_config.get("_class_name"):
                config = dict(scheduler_config)  # the model's own class: keep its config verbatim
            self._templates[name] = cls.from_config(config, **spec.overrides)

    @property
    def names(self) -> list[str]:
        return list(self._templates)

    def resolve(self, name: str) -> str:
        """Map a requested name ('' = model default, aliases allowed) to a canonical name."""
        if not name.strip():
            return self.default_name
        key = canonical_name(name)
        if key in self._unsupported:
            raise NotFound(f"scheduler {shown(name)} is not available for this model: {self._unsupported[key]}; "
                           f"choose one of: {', '.join(self.names)}")
        if key not in self._templates:
            raise NotFound(f"scheduler {shown(name)} is not available; choose one of: {', '.join(self.names)}")
        return key

    def create(self, name: str) -> Any:
        return copy.deepcopy(self._templates[self.resolve(name)])

    def total_steps(self, name: str, steps: int, strength: float | None = None) -> int:
        """UNet evaluations per image for ``steps`` (PNDM runs one more than asked), or for the part
        of them an img2img ``strength`` keeps."""
        scheduler = self.create(name)
        scheduler.set_timesteps(steps)
        if strength is None:
            return len(scheduler.timesteps)
        return len(timesteps_for_strength(scheduler, steps, strength))


def timesteps_for_strength(scheduler: Any, steps: int, strength: float) -> Any:
    """The timesteps img2img runs: the last ``int(steps * strength)`` of ``steps``, as diffusers'
    ``get_timesteps`` picks them (and, like it, tells the scheduler where it starts).

    Call after ``set_timesteps(steps)``. Strength 0 leaves no steps.
    """
    init_timestep = min(int(steps * strength), steps)
    start = max(steps - init_timestep, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]
