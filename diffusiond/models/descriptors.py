"""The I/O contract of each network, in one place.

For every network a backend runs (text encoder, UNet, VAE decoder, VAE
encoder) a ``NetworkDescriptor`` states its input and output names, dtypes
and dimensions, which dimensions are dynamic, how to make sample inputs, and
the (min, opt, max) shapes a ``ShapeProfile`` asks it to serve. ONNX export
reads it (input/output names, dynamic axes, sample inputs to trace with and to
verify against), the ONNX Runtime backend checks sessions against it, and a
TensorRT engine build and its buffer allocation can read the same profiles and
shape dictionaries. Names follow Optimum's ONNX layout, so directories exported
by ``optimum-cli export onnx`` line up with ours.

Dimensions are symbols resolved per call: ``batch`` (images per network call;
the guided UNet runs two per image), ``height``/``width`` (pixels),
``latent_height``/``latent_width`` (pixels / VAE factor), or fixed integers.
Nothing here imports torch or a runtime: numpy only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusiond.errors import InvalidArgument
from diffusiond.models.config import load_model_config, read_json

Dim = int | str

TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
# Step caching: the UNet's shallow blocks alone, run on the deep features a full pass returned.
UNET_SHALLOW = "unet_shallow"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, UNET_SHALLOW)
# ControlNet, exported when asked: the ControlNet alone (-> residuals, each row times its own scale) and the
# UNet that adds them to its skip connections and middle block. Their names are in ``control_residuals``.
CONTROLNET = "controlnet"
UNET_CONTROLLED = "unet_controlled"
CONTROL_COMPONENTS = (CONTROLNET, UNET_CONTROLLED)
REQUIRED_COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER)  # the encoder only serves image inputs


class Sample(enum.Enum):
    """What values a sample input holds (tracing and verification need realistic ones)."""

    TOKENS = "tokens"  # token ids in [0, vocab)
    TIMESTEP = "timestep"  # diffusion timesteps in [0, num_train_timesteps)
    NORMAL = "normal"  # latents, hidden states
    IMAGE = "image"  # pixels in [-1, 1]
    CONTROL = "control"  # control images in [0, 1]
    SCALE = "scale"  # per-row conditioning scales in [0, 2]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[Dim, ...]
    sample: Sample = Sample.NORMAL

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        try:
            return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)
        except KeyError as exc:
            raise KeyError(f"{self.name}: no size given for dimension {exc.args[0]!r}") from None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {axis: d for axis, d in enumerate(self.dims) if isinstance(d, str)}

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.opt <= self.max:
            raise InvalidArgument("profile", f"need 0 < min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    def scaled(self, factor: int, divisor: int = 1) -> Range:
        return Range(self.min * factor // divisor, self.opt * factor // divisor, self.max * factor // divisor)

    def to_json(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class ShapeProfile:
    """The shapes an artifact is built to serve.

    ``images`` counts images per request batch: the guided UNet sees twice as
    many rows. ``height``/``width`` are in pixels. An ONNX model with dynamic
    axes serves any shape; this range is what export verifies and what a
    TensorRT engine is optimised for.
    """

    images: Range = Range(1, 1, 4)
    height: Range = Range(256, 512, 1024)
    width: Range = Range(256, 512, 1024)

    @classmethod
    def around(cls, native: int, max_images: int = 4) -> ShapeProfile:
        """Half to twice the model's native size, opt at the native size."""
        size = Range(max(64, native // 2), native, native * 2)
        return cls(images=Range(1, 1, max_images), height=size, width=size)

    def to_json(self) -> dict[str, list[int]]:
        return {"images": self.images.to_json(), "height": self.height.to_json(), "width": self.width.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, list[int]]) -> ShapeProfile:
        return cls(images=Range(*data["images"]), height=Range(*data["height"]), width=Range(*data["width"]))


@dataclass(frozen=True)
class SDDims:
    """The sizes of a Stable-Diffusion-class model that fix its networks' shapes."""

    latent_channels: int
    unet_in_channels: int
    unet_out_channels: int
    vae_scale_factor: int
    text_max_length: int
    text_hidden_size: int
    vocab_size: int
    num_train_timesteps: int
    image_channels: int = 3
    # Channels of the deep features a step-caching full pass returns, by depth (index 0: depth 1).
    deep_channels: tuple[int, ...] = ()
    # The residuals a ControlNet adds to the UNet, in diffusers' order (conv_in, then each down block's
    # resnets and downsampler), as (channels, level): level n is the latent size halved n times; the
    # middle block's residual comes last.
    control_residuals: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_model_dir(cls, directory: Path) -> SDDims:
        """Read from a diffusers or Optimum-ONNX directory's configs (no weights are loaded)."""
        config = load_model_config(directory)
        unet = read_json(directory / "unet" / "config.json")
        text = read_json(directory / "text_encoder" / "config.json")
        return cls(
            latent_channels=config.latent_channels,
            unet_in_channels=int(unet.get("in_channels", config.latent_channels)),
            unet_out_channels=int(unet.get("out_channels", config.latent_channels)),
            vae_scale_factor=config.vae_scale_factor,
            text_max_length=config.text_max_length,
            text_hidden_size=int(unet.get("cross_attention_dim", config.text_hidden_size)),
            vocab_size=int(text.get("vocab_size", 49408)),
            num_train_timesteps=int(config.scheduler_config.get("num_train_timesteps", 1000)),
            # The features entering up block n - d come out of up block n - d - 1, whose channels are
            # the down path's block d: block_out_channels[d].
            deep_channels=tuple(int(c) for c in unet.get("block_out_channels", ())[1:]),
            control_residuals=control_residuals(unet),
        )


def control_residuals(unet: Mapping) -> tuple[tuple[int, int], ...]:
    """(channels, level) of each residual a ControlNet returns for a UNet with this config (see SDDims)."""
    channels = [int(c) for c in unet.get("block_out_channels", ())]
    if not channels:
        return ()
    layers = unet.get("layers_per_block", 2)
    residuals = [(channels[0], 0)]
    for i, width in enumerate(channels):
        residuals += [(width, i)] * int(layers if isinstance(layers, int) else layers[i])
        if i < len(channels) - 1:
            residuals.append((width, i + 1))
    residuals.append((channels[-1], len(channels) - 1))  # the middle block
    return tuple(residuals)


def control_residual_names(dims: SDDims) -> list[str]:
    count = len(dims.control_residuals)
    return [f"down_block_res_sample_{i}" for i in range(count - 1)] + ["mid_block_res_sample"]


@dataclass(frozen=True)
class NetworkDescriptor:
    """One network's I/O contract. ``name`` is also its folder in the ONNX layout."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: SDDims
    rows_per_image: int = 1  # the guided UNet runs 2 rows per image
    step_cache_depth: int = 0  # >0: the UNet's deep features at this depth are an output or input

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def sizes(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Symbol values for one call: ``batch`` rows, an image of ``height`` x ``width`` pixels."""
        f = self.dims.vae_scale_factor
        if height % f or width % f:
            raise InvalidArgument("size", f"{width}x{height} is not a multiple of the VAE factor {f}")
        sizes = {
            "batch": batch,
            "height": height,
            "width": width,
            "latent_height": height // f,
            "latent_width": width // f,
        }
        levels = {}
        level_height, level_width = sizes["latent_height"], sizes["latent_width"]
        for level in range(max(8, self.step_cache_depth)):  # each down block halves, rounding up
            levels[f"level{level}_height"], levels[f"level{level}_width"] = level_height, level_width
            level_height, level_width = -(-level_height // 2), -(-level_width // 2)
        deep = max(self.step_cache_depth - 1, 0)
        return {**sizes, **levels, "deep_height": levels[f"level{deep}_height"], "deep_width": levels[f"level{deep}_width"]}

    def shape_dict(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Every input's and output's shape for one call (what buffer allocation needs)."""
        sizes = self.sizes(batch, height, width)
        return {t.name: t.shape(sizes) for t in (*self.inputs, *self.outputs)}

    def input_profile(self, profile: ShapeProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of each input for ``profile`` (a TensorRT optimisation profile)."""
        rows = profile.images
        if self.rows_per_image > 1:  # unguided calls run one row per image, guided ones two
            rows = Range(rows.min, rows.opt * self.rows_per_image, rows.max * self.rows_per_image)
        corners = [
            self.sizes(getattr(rows, k), getattr(profile.height, k), getattr(profile.width, k))
            for k in ("min", "opt", "max")
        ]
        return {t.name: tuple(t.shape(c) for c in corners) for t in self.inputs}

    def sample_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Realistic random inputs of the given shape, in each input's dtype."""
        rng = np.random.default_rng(seed)
        sizes = self.sizes(batch, height, width)
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = spec.shape(sizes)
            if spec.sample is Sample.TOKENS:
                value = rng.integers(0, self.dims.vocab_size, size=shape)
            elif spec.sample is Sample.TIMESTEP:
                # A different timestep in every row: rows of one call may be at different steps
                # (requests batched mid-generation), and a trace or check with equal rows would
                # not tell a network that uses one timestep for all.
                value = rng.choice(self.dims.num_train_timesteps, size=shape, replace=False)
            elif spec.sample is Sample.IMAGE:
                value = rng.uniform(-1.0, 1.0, size=shape)
            elif spec.sample is Sample.CONTROL:
                value = rng.uniform(0.0, 1.0, size=shape)
            elif spec.sample is Sample.SCALE:
                value = rng.uniform(0.0, 2.0, size=shape)
            else:
                value = rng.standard_normal(size=shape)
            out[spec.name] = value.astype(spec.dtype)
        return out

    def to_json(self, profile: ShapeProfile | None = None) -> dict[str, object]:
        data: dict[str, object] = {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in self.dynamic_axes().items()},
        }
        if profile is not None:
            data["profile"] = {
                name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                for name, s in self.input_profile(profile).items()
            }
        return data


def sd_descriptors(dims: SDDims, step_cache_depth: int = 0, control: bool = False) -> dict[str, NetworkDescriptor]:
    """The networks of a Stable Diffusion 1.x/2.x pipeline, keyed by component name.

    With ``step_cache_depth`` > 0 the UNet also returns its deep features at that
    depth, and ``unet_shallow`` (its shallow blocks alone) takes them. With
    ``control`` the ControlNet pair is described too (``CONTROL_COMPONENTS``).
    """
    c, t, d = dims.latent_channels, dims.text_max_length, dims.text_hidden_size
    unet_inputs = (
        TensorSpec("sample", "float32", ("batch", dims.unet_in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",), Sample.TIMESTEP),
        TensorSpec("encoder_hidden_states", "float32", ("batch", t, d)),
    )
    out_sample = TensorSpec("out_sample", "float32", ("batch", dims.unet_out_channels, "latent_height", "latent_width"))
    deep = ()
    if step_cache_depth:
        if not 1 <= step_cache_depth <= len(dims.deep_channels):
            raise InvalidArgument(
                "step_cache_depth", f"must be between 1 and {len(dims.deep_channels)} for this UNet, got {step_cache_depth}"
            )
        channels = dims.deep_channels[step_cache_depth - 1]
        deep = (TensorSpec("deep_features", "float32", ("batch", channels, "deep_height", "deep_width")),)
    latent = ("batch", c, "latent_height", "latent_width")
    image = ("batch", dims.image_channels, "height", "width")
    descriptors = {
        TEXT_ENCODER: NetworkDescriptor(
            TEXT_ENCODER,
            inputs=(TensorSpec("input_ids", "int64", ("batch", t), Sample.TOKENS),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", ("batch", t, d)),
                TensorSpec("pooler_output", "float32", ("batch", d)),
            ),
            dims=dims,
        ),
        UNET: NetworkDescriptor(
            UNET, inputs=unet_inputs, outputs=(out_sample, *deep), dims=dims, rows_per_image=2,
            step_cache_depth=step_cache_depth,
        ),
        VAE_DECODER: NetworkDescriptor(
            VAE_DECODER,
            inputs=(TensorSpec("latent_sample", "float32", latent),),
            outputs=(TensorSpec("sample", "float32", image),),
            dims=dims,
        ),
        VAE_ENCODER: NetworkDescriptor(
            VAE_ENCODER,
            inputs=(TensorSpec("sample", "float32", image, Sample.IMAGE),),
            # The distribution's parameters (mean and log-variance stacked on channels), as Optimum exports.
            outputs=(TensorSpec("latent_parameters", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
            dims=dims,
        ),
    }
    if step_cache_depth:
        descriptors[UNET_SHALLOW] = NetworkDescriptor(
            UNET_SHALLOW, inputs=(*unet_inputs, *deep), outputs=(out_sample,), dims=dims, rows_per_image=2,
            step_cache_depth=step_cache_depth,
        )
    if control:
        residuals = tuple(
            TensorSpec(name, "float32", ("batch", channels, f"level{level}_height", f"level{level}_width"))
            for name, (channels, level) in zip(control_residual_names(dims), dims.control_residuals)
        )
        descriptors[CONTROLNET] = NetworkDescriptor(
            CONTROLNET,
            inputs=(
                *unet_inputs,
                TensorSpec("controlnet_cond", "float32", ("batch", dims.image_channels, "height", "width"), Sample.CONTROL),
                TensorSpec("conditioning_scale", "float32", ("batch",), Sample.SCALE),
            ),
            outputs=residuals, dims=dims, rows_per_image=2,
        )
        descriptors[UNET_CONTROLLED] = NetworkDescriptor(
            UNET_CONTROLLED, inputs=(*unet_inputs, *residuals), outputs=(out_sample,), dims=dims, rows_per_image=2,
        )
    return descriptors


def descriptors_for(directory: Path) -> dict[str, NetworkDescriptor]:
    """The descriptors of a model or export directory (an export's manifest says its step-cache depth)."""
    return sd_descriptors(SDDims.from_model_dir(directory), step_cache_depth_of(directory),
                          control=(directory / CONTROLNET).is_dir())


def step_cache_depth_of(directory: Path) -> int:
    """The step-cache depth an export was made with (0: none, or not an export)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return 0
    return int(read_json(manifest).get("options", {}).get("step_cache_depth", 0))


def controlnet_name_of(directory: Path) -> str:
    """The name an export's ControlNet is served under ("": it has none)."""
    if not (directory / CONTROLNET).is_dir():
        return ""
    control = directory / CONTROLNET / "diffusiond_control.json"  # written by the ONNX export, with the name
    return str((read_json(control) if control.is_file() else {}).get("name") or CONTROLNET)


def describe(descriptors: Mapping[str, NetworkDescriptor]) -> str:
    """A readable dump of the contracts (for docs and debugging)."""
    return json.dumps({name: d.to_json() for name, d in descriptors.items()}, indent=2)
