"""What every backend that runs exported graphs shares (ONNX Runtime, TensorRT, and the next ones).

A runtime's backend file loads one ``Graph`` per network (a session, an
engine) that runs named tensors, describes its artifact as an ``Artifact``,
and hands both to ``GraphBackend``, which does the rest once for every runtime:

- checks each graph's inputs against the model descriptors, and picks its
  output by the descriptor's name (with Optimum's alternatives);
- keeps the backend boundary in float32 torch tensors: inputs are cast to each
  graph's own input dtypes (integer timesteps rounded, int32 token ids, fp16
  I/O), outputs come back as float32;
- shapes the timestep: the [B] vector where the graph takes one timestep per
  row; where it takes one for the whole call (a scalar or a fixed [1], as some
  Optimum exports do) the rows are run in groups of equal timestep and put back
  in their order, so rows at different steps still get their own;
- returns the VAE encoder's mean (the first half of ``latent_parameters``);
- turns the runtime's out-of-memory failure into ``OutOfMemory``;
- refuses an artifact that is incomplete, of another precision or from another
  source model than the operator asked for;
- warms up by running every network at its profile's optimal shapes;
- caches steps where the export carries the step-caching pair (a UNet that
  also returns its deep features, and ``unet_shallow``) and the runtime can
  return both UNet outputs of one run;
- runs the export's ControlNet where it carries the pair ``controlnet`` (the
  residuals, each row times its own scale) and ``unet_controlled`` (the UNet
  that adds them), under the name its manifest records.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from diffusiond.backends.base import AdapterSet, BackendSettings, ControlRows, translate_out_of_memory
from diffusiond.errors import FailedPrecondition
from diffusiond.models.descriptors import (
    CONTROLNET,
    REQUIRED_COMPONENTS,
    TEXT_ENCODER,
    UNET,
    UNET_CONTROLLED,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    NetworkDescriptor,
    ShapeProfile,
    controlnet_name_of,
)

log = logging.getLogger(__name__)

# Output names other exporters use where ours differ (Optimum's VAE encoder may return the mean itself).
ALTERNATIVE_OUTPUTS = {VAE_ENCODER: ("latent_sample",)}


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: torch.dtype  # what the graph takes; the boundary's float32/int64 tensors are cast to it
    shape: tuple[int | None, ...]  # None: a dynamic axis; (): a scalar


class Graph(Protocol):
    """One network loaded in a runtime: the part a new runtime implements."""

    inputs: Mapping[str, GraphInput]
    outputs: Sequence[str]

    def run(self, feeds: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """``feeds`` (each in its input's dtype, on the backend's device) -> the named output."""
        ...


@runtime_checkable
class MultiOutputGraph(Graph, Protocol):
    """A graph that can return every output of one run (step caching needs the UNet's two)."""

    def run_all(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Artifact:
    """What an exported directory holds, as its manifest (or, without one, its files) tells."""

    directory: Path
    kind: str  # "ONNX export", "TensorRT artifact": for messages
    precision: str  # "fp32", "fp16", "int8"
    source_sha256: str | None  # the source model's hash; None: unknown (no manifest)
    profile: ShapeProfile  # the shapes it was made for; warm-up runs at their optimum
    problems: tuple[str, ...] = ()  # runtime-specific reasons it cannot be served here
    adapters: AdapterSet = ()  # LoRA adapters fused into its UNet at export (name, scale)


def check_artifact(artifact: Artifact, settings: BackendSettings, backend: str) -> None:
    """FailedPrecondition naming every reason ``artifact`` is not what ``settings`` asks for."""
    problems = list(artifact.problems)
    if settings.expect_precision and settings.expect_precision != artifact.precision:
        problems.append(f"holds {artifact.precision} networks, but precision {settings.expect_precision} was asked for")
    expected = settings.expect_source_sha256.lower()
    if expected and artifact.source_sha256 is None:
        problems.append(
            f"has no manifest.json, so its source model cannot be checked against the expected hash {expected[:16]}..."
        )
    elif expected and not artifact.source_sha256.startswith(expected):
        problems.append(
            f"was made from another model: its source hash is {artifact.source_sha256[:16] or 'unknown'}..., "
            f"expected {expected[:16]}..."
        )
    if problems:
        raise FailedPrecondition(f"{artifact.kind} {artifact.directory} cannot be served: {'; '.join(problems)}")
    if settings.dtype not in ("fp32", "") and not settings.expect_precision:
        log.warning("--dtype %s is ignored by the %s backend: the %s fixes the precision "
                    "(use --precision to require one)", settings.dtype, backend, artifact.kind)


class TimestepForm(enum.Enum):
    ROWS = "one per row"  # [B]
    SCALAR = "a scalar"  # []: one for the call
    SINGLE = "one element"  # [1]: one for the call


def timestep_form(spec: GraphInput) -> TimestepForm:
    if len(spec.shape) == 0:
        return TimestepForm.SCALAR
    if len(spec.shape) == 1:
        return TimestepForm.SINGLE if spec.shape[0] == 1 else TimestepForm.ROWS
    raise FailedPrecondition(
        f"the unet's timestep input has shape {list(spec.shape)}; diffusiond feeds a scalar, [1] or [batch]"
    )


class GraphBackend:
    """The Backend protocol over the graphs of an exported artifact; a runtime's backend subclasses it."""

    name = ""

    def __init__(
        self,
        graphs: Mapping[str, Graph],
        descriptors: Mapping[str, NetworkDescriptor],
        artifact: Artifact,
        device: torch.device,
    ) -> None:
        missing = [c for c in REQUIRED_COMPONENTS if c not in graphs]
        if missing:
            raise FailedPrecondition(f"{artifact.kind} {artifact.directory} has no {', '.join(missing)}")
        self.graphs = dict(graphs)
        self.artifact = artifact
        self._descriptors = descriptors
        self._device = device
        self._outputs: dict[str, str] = {}
        for component, graph in self.graphs.items():
            descriptor = descriptors[component]
            expected = descriptor.input_names
            got = list(graph.inputs)
            if sorted(got) != sorted(expected):
                absent = [n for n in expected if n not in got]
                extra = [n for n in got if n not in expected]
                raise FailedPrecondition(
                    f"{artifact.directory}: the {component} graph's inputs are {', '.join(got)}; diffusiond feeds "
                    f"{', '.join(expected)} (missing: {', '.join(absent) or 'none'}, "
                    f"unsupported: {', '.join(extra) or 'none'})"
                )
            preferred = (descriptor.output_names[0], *ALTERNATIVE_OUTPUTS.get(component, ()))
            self._outputs[component] = next((n for n in preferred if n in graph.outputs), graph.outputs[0])
        self._timestep_form = timestep_form(self.graphs[UNET].inputs["timestep"])
        controlled = CONTROLNET in self.graphs and UNET_CONTROLLED in self.graphs
        controlled = controlled and isinstance(self.graphs[CONTROLNET], MultiOutputGraph)
        self._controlnet = controlnet_name_of(artifact.directory) if controlled else ""

    @property
    def fused_adapters(self) -> AdapterSet:
        """The LoRA adapters fused into this artifact's UNet (fixed: a request may not ask for others)."""
        return self.artifact.adapters

    # -- what a runtime may refine --------------------------------------------------------------

    @staticmethod
    def is_runtime_out_of_memory(exc: BaseException) -> bool:
        """Whether ``exc`` is this runtime's way of saying an allocation failed (PyTorch's is always known)."""
        return False

    # -- Backend protocol -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype_name(self) -> str:
        return self.artifact.precision

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(TEXT_ENCODER, {"input_ids": input_ids})

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0]
        t = timestep.reshape(-1)
        if t.numel() == 1 and rows > 1:
            t = t.expand(rows)
        if t.numel() != rows:
            raise ValueError(f"unet: {t.numel()} timesteps for {rows} rows")
        if self._timestep_form is TimestepForm.ROWS:
            return self._run(UNET, {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states})
        return self._unet_by_timestep(sample, t, encoder_hidden_states)

    def step_cache_depths(self) -> tuple[int, ...]:
        depth = self._descriptors[UNET].step_cache_depth
        unet = self.graphs[UNET]
        if (
            depth
            and UNET_SHALLOW in self.graphs
            and "deep_features" in unet.outputs
            and isinstance(unet, MultiOutputGraph)
            and self._timestep_form is TimestepForm.ROWS
        ):
            return (depth,)
        return ()

    def unet_split(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        depth: int,
        deep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if depth not in self.step_cache_depths():
            raise FailedPrecondition(
                f"this {self.artifact.kind} cannot run step caching at depth {depth} "
                f"(it can at: {', '.join(map(str, self.step_cache_depths())) or 'none'})"
            )
        feeds = {"sample": sample, "timestep": timestep.reshape(-1), "encoder_hidden_states": encoder_hidden_states}
        if deep is not None:
            return self._run(UNET_SHALLOW, {**feeds, "deep_features": deep}), deep
        graph = self.graphs[UNET]
        with translate_out_of_memory(UNET, self.is_runtime_out_of_memory):
            cast = {name: self._cast(graph.inputs[name], value) for name, value in feeds.items()}
            outs = graph.run_all(cast)  # type: ignore[attr-defined]
        out, features = outs[self._outputs[UNET]], outs["deep_features"]
        return out.to(self._device, torch.float32).contiguous(), features.to(self._device, torch.float32).contiguous()

    def attach_controlnet(self, name: str, path: Path) -> None:
        raise FailedPrecondition(
            f"ControlNet {name!r}: an {self.artifact.kind} runs the ControlNet exported with it "
            f"({self._controlnet or 'none'}); export one with `diffusiond export onnx --controlnet NAME=DIR`"
        )

    def controlnet_names(self) -> tuple[str, ...]:
        return (self._controlnet,) if self._controlnet else ()

    def unet_controlled(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, control: ControlRows
    ) -> torch.Tensor:
        if control.name != self._controlnet:
            raise FailedPrecondition(f"this {self.artifact.kind} carries no ControlNet named {control.name!r}")
        if self._timestep_form is not TimestepForm.ROWS:
            raise FailedPrecondition(f"this {self.artifact.kind}'s UNet takes one timestep per call, not per row")
        feeds = {"sample": sample, "timestep": timestep.reshape(-1), "encoder_hidden_states": encoder_hidden_states}
        graph = self.graphs[CONTROLNET]
        with translate_out_of_memory(CONTROLNET, self.is_runtime_out_of_memory):
            control_feeds = {**feeds, "controlnet_cond": control.image, "conditioning_scale": control.scale}
            cast = {name: self._cast(graph.inputs[name], value) for name, value in control_feeds.items()}
            residuals = graph.run_all(cast)  # type: ignore[attr-defined]
        return self._run(UNET_CONTROLLED, {**feeds, **residuals})

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, {"latent_sample": latents})

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        if VAE_ENCODER not in self.graphs:
            raise FailedPrecondition(f"this {self.artifact.kind} has no vae_encoder, which image inputs need")
        out = self._run(VAE_ENCODER, {"sample": images})
        channels = self._descriptors[VAE_ENCODER].dims.latent_channels
        if out.shape[1] == 2 * channels:  # mean and log-variance: the mean is the first half
            out = out[:, :channels].contiguous()
        return out

    def warm_up(self) -> None:
        """Run every network once at the artifact profile's optimal shapes."""
        profile = self.artifact.profile
        for component in self.graphs:
            descriptor = self._descriptors[component]
            rows = profile.images.opt * descriptor.rows_per_image
            feeds = {
                name: torch.from_numpy(value).to(self._device)
                for name, value in descriptor.sample_inputs(rows, profile.height.opt, profile.width.opt).items()
            }
            if component == UNET:
                self.unet(feeds["sample"], feeds["timestep"].float(), feeds["encoder_hidden_states"])
            else:
                self._run(component, feeds)

    def close(self) -> None:
        self.graphs.clear()

    # -- shared machinery -------------------------------------------------------------------------

    def _run(self, component: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        graph = self.graphs[component]
        with translate_out_of_memory(component, self.is_runtime_out_of_memory):
            cast = {name: self._cast(graph.inputs[name], value) for name, value in feeds.items()}
            out = graph.run(cast, self._outputs[component])
            return out.to(device=self._device, dtype=torch.float32).contiguous()

    def _cast(self, spec: GraphInput, value: torch.Tensor) -> torch.Tensor:
        if not spec.dtype.is_floating_point and value.is_floating_point():
            value = value.round()  # float timesteps into an integer input: round, don't truncate
        return value.to(device=self._device, dtype=spec.dtype).contiguous()

    def _unet_by_timestep(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """A graph that takes one timestep per call: one call per distinct timestep, rows put back in order."""
        shape = () if self._timestep_form is TimestepForm.SCALAR else (1,)
        values, group = torch.unique(t, return_inverse=True)
        if len(values) == 1:
            return self._run(UNET, {"sample": sample, "timestep": values.reshape(shape), "encoder_hidden_states": context})
        out: torch.Tensor | None = None
        for index, value in enumerate(values):
            rows = (group == index).nonzero(as_tuple=True)[0]
            piece = self._run(UNET, {
                "sample": sample[rows], "timestep": value.reshape(shape), "encoder_hidden_states": context[rows],
            })
            if out is None:
                out = piece.new_empty((sample.shape[0], *piece.shape[1:]))
            out[rows] = piece
        assert out is not None
        return out


def warm_up(backend: GraphBackend) -> None:
    """A graph backend plug-in's warm-up (through the backend, so a wrapper around it is warmed up too)."""
    backend.warm_up()
