"""ControlNets: attaching them to a model, and turning a request's control options into a ``ControlSpec``.

A ControlNet is attached to one model at start (``--controlnet [MODEL:]NAME=DIR``;
the built-in model gets the shipped canny ControlNet as ``canny`` by itself).
A request names one (or takes the model's first) and gives either a control
image or an image to take canny edges of. Either image is decoded with the
same checks as every client image (``image_decode``), then resized to the
request's width x height when it has another size (Lanczos, as diffusers'
ControlNet pipelines resize: the image is stretched, not cropped) and, for
``canny_from``, edge-mapped at that size by ``diffusiond.models.canny.canny``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffusiond.backends.base import RunsControlNets
from diffusiond.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from diffusiond.models.canny import DEFAULT_HIGH, DEFAULT_LOW, MAX_THRESHOLD, canny
from diffusiond.pipeline.request import ControlSpec
from diffusiond.service.image_decode import ImageLimits, decode_image

log = logging.getLogger(__name__)

BUILTIN_CONTROLNET_DIR = Path(__file__).resolve().parent.parent / "models" / "builtin_controlnet"
BUILTIN_CONTROLNET_NAME = "canny"
CONTROL_CONFIG = "diffusiond_control.json"  # written by diffusiond.training.train_controlnet
MAX_CONTROL_SCALE = 2.0


@dataclass(frozen=True)
class ControlNetInfo:
    """An attached ControlNet, as ListModels reports it."""

    name: str
    path: str
    conditioning: str  # "canny" when its directory says so; "" unknown (the client sends control images)


@dataclass(frozen=True)
class ControlNetSource:
    """``serve --controlnet [MODEL:]NAME=DIR``: a ControlNet directory for one model (default: the first)."""

    model: str
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> ControlNetSource:
        head, sep, location = text.partition("=")
        model, _, name = head.rpartition(":")
        if not sep or not name or not location:
            raise ValueError(f"--controlnet takes [MODEL:]NAME=DIR, got {text!r}")
        path = BUILTIN_CONTROLNET_DIR if location == "builtin" else Path(location)
        return cls(model, name, path)


@dataclass(frozen=True)
class ControlParams:
    """A request's control options as the client sent them; None / "" select the defaults."""

    controlnet: str = ""  # "": the model's first ControlNet
    image: bytes = b""
    canny_from: bytes = b""
    canny_low: float | None = None  # default DEFAULT_LOW
    canny_high: float | None = None  # default DEFAULT_HIGH
    scale: float | None = None  # default 1.0
    guidance_start: float | None = None  # default 0.0
    guidance_end: float | None = None  # default 1.0


def attach(backend: object, name: str, path: Path) -> ControlNetInfo:
    """Load the ControlNet at ``path`` onto ``backend`` under ``name``."""
    if not isinstance(backend, RunsControlNets):
        raise FailedPrecondition(f"ControlNet {name!r}: the {getattr(backend, 'name', '?')} backend runs no ControlNet")
    if not path.is_dir():
        raise FailedPrecondition(f"ControlNet {name!r}: {path} is not a directory")
    backend.attach_controlnet(name, path)
    conditioning = ""
    config = path / CONTROL_CONFIG
    if config.is_file():
        conditioning = str(json.loads(config.read_text()).get("conditioning", ""))
    log.info("attached ControlNet %s from %s (conditioning: %s)", name, path, conditioning or "unknown")
    return ControlNetInfo(name, str(path), conditioning)


def carried(backend: object) -> tuple[str, ...]:
    """The ControlNets a backend brought with it (an export made with one)."""
    return tuple(backend.controlnet_names()) if isinstance(backend, RunsControlNets) else ()


def carried_info(name: str, model_dir: Path) -> ControlNetInfo:
    config = model_dir / "controlnet" / CONTROL_CONFIG
    conditioning = str(json.loads(config.read_text()).get("conditioning", "")) if config.is_file() else ""
    return ControlNetInfo(name, str(model_dir / "controlnet"), conditioning)


def resolve_control(
    params: ControlParams, controlnets: dict[str, ControlNetInfo], model_name: str, width: int, height: int,
    limits: ImageLimits | None = None,
) -> ControlSpec:
    """The validated ``ControlSpec`` of ``params`` for a ``width`` x ``height`` request."""
    if not controlnets:
        raise FailedPrecondition(f"control: model {model_name!r} has no ControlNet attached (serve it with --controlnet)")
    name = params.controlnet or next(iter(controlnets))
    if name not in controlnets:
        raise NotFound(
            f"control.controlnet: ControlNet {shown(name)} is not attached to model {model_name!r}; "
            f"attached: {', '.join(controlnets)}"
        )
    scale = 1.0 if params.scale is None else params.scale
    start = 0.0 if params.guidance_start is None else params.guidance_start
    end = 1.0 if params.guidance_end is None else params.guidance_end
    for field, value, low, high in (
        ("control.scale", scale, 0.0, MAX_CONTROL_SCALE),
        ("control.guidance_start", start, 0.0, 1.0),
        ("control.guidance_end", end, 0.0, 1.0),
    ):
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")
    if start >= end:
        raise InvalidArgument("control.guidance_start", f"must be below control.guidance_end ({end}), got {start}")

    limits = limits or ImageLimits()
    if bool(params.image) == bool(params.canny_from):
        raise InvalidArgument("control", "give exactly one of control.image and control.canny_from")
    if params.image:
        if params.canny_low is not None or params.canny_high is not None:
            raise InvalidArgument("control.canny_low", "canny thresholds apply only to control.canny_from")
        pixels = _at_size(decode_image(params.image, "control.image", limits), width, height)
    else:
        low = DEFAULT_LOW if params.canny_low is None else params.canny_low
        high = DEFAULT_HIGH if params.canny_high is None else params.canny_high
        for field, value in (("control.canny_low", low), ("control.canny_high", high)):
            if not math.isfinite(value) or not 0.0 <= value <= MAX_THRESHOLD:
                raise InvalidArgument(field, f"must be between 0 and {MAX_THRESHOLD:.0f}, got {value}")
        if low > high:
            raise InvalidArgument("control.canny_low", f"must not exceed control.canny_high ({high}), got {low}")
        pixels = canny(_at_size(decode_image(params.canny_from, "control.canny_from", limits), width, height), low, high)
    return ControlSpec(name=name, image=pixels, scale=float(scale), guidance_start=float(start),
                       guidance_end=float(end))


def _at_size(image: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: resized with Lanczos when its size differs (diffusers' control image rule)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
