"""Compiled PyTorch backend: the eager backend's modules, prepared for speed and compiled with ``torch.compile``.

It is ``TorchEagerBackend`` (same loading, precisions, devices, out-of-memory
translation, and whatever hooks that class gains) with its UNet and VAE
decoder changed in place before the first call:

- attention through ``scaled_dot_product_attention`` (diffusers'
  ``AttnProcessor2_0``, or ``FusedAttnProcessor2_0`` when projections are fused);
- fused projections (``fuse_qkv_projections``): one matmul for self-attention's
  Q, K and V and one for cross-attention's K and V;
- ``channels_last`` memory format, which oneDNN and cuDNN convolutions prefer;
- ``nn.Module.compile`` (mode ``default`` on the CPU, ``reduce-overhead`` on
  CUDA, which captures CUDA graphs), applied to the modules themselves, so
  every path that calls them is compiled.

The text encoder runs once per distinct prompt (the prompt cache keeps its
output) and the VAE encoder only for image inputs: both stay eager, so neither
costs a compile at start. Cross-attention keys and values are not precomputed
here (the fused processors project them inside the compiled graph), and a
step-cached pass runs the UNet's blocks one by one, outside the compiled
forward.

Shapes. A continuous batcher changes the UNet's row count from step to step.
With ``dynamic="auto"`` (the default) torch compiles the first shape
specialised and, on the first shape change, once more with the changed
dimensions symbolic; warm-up runs two row counts, so that recompile happens
before serving and later row counts reuse it. Rows of 1 are always specialised
by torch (a separate compile, paid by the first unguided request).
``dynamic="true"`` is symbolic from the start; ``"false"`` compiles each shape
(beyond torch's recompile limit, 8, a shape runs eager).

Compiled artifacts (Inductor's FX graph and AOT autograd caches) are kept
under the diffusiond cache, so a restart skips code generation and the C++
compiles; Dynamo's tracing is still paid on every start.

CUDA graphs (``reduce-overhead`` on CUDA) replay into static output buffers, so
each call marks a new step and its outputs are cloned. Untested here (no GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusiond.backends.base import BackendPlugin, BackendSettings
from diffusiond.backends.torch_eager import TorchEagerBackend
from diffusiond.errors import InvalidArgument
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import UNET, VAE_DECODER, ShapeProfile, descriptors_for

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DYNAMIC = {"auto": None, "true": True, "false": False}
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@dataclass(frozen=True)
class TorchCompiledOptions:
    """How the modules are prepared and compiled (defaults = CLI defaults)."""

    # torch.compile mode; "auto": "reduce-overhead" (CUDA graphs) on CUDA, "default" on the CPU.
    mode: str = "auto"
    dynamic: str = "auto"  # "auto": torch's automatic dynamic shapes; "true"; "false" (see the module docstring)
    compiler: str = "inductor"  # torch.compile backend ("eager"/"aot_eager" skip code generation: for debugging)
    channels_last: bool = True
    fuse_qkv: bool = True
    sdpa: bool = True  # False: diffusers' plain attention (matmul, softmax, matmul), for comparison
    cache_dir: str = ""  # Inductor's cache; empty: $TORCHINDUCTOR_CACHE_DIR, else <diffusiond cache>/torch-compile

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise InvalidArgument("compile mode", f"{self.mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.dynamic not in DYNAMIC:
            raise InvalidArgument("compile dynamic", f"{self.dynamic!r} is not one of {', '.join(DYNAMIC)}")
        if self.fuse_qkv and not self.sdpa:
            raise InvalidArgument("sdpa", "fused QKV projections run through SDPA: turn fusing off too (--no-fuse-qkv)")


def configure_cache(option: str) -> Path:
    """Point Inductor's on-disk caches at ``option`` (or keep the operator's $TORCHINDUCTOR_CACHE_DIR, else use
    the diffusiond cache), with its FX graph and AOT autograd caches on. Process-wide: compiles share it."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from diffusiond.models.builtin import cache_root

    # Importing diffusers already sets the variable to torch's default (a folder in /tmp): that one is not
    # the operator's choice.
    current = os.environ.get(CACHE_ENV, "")
    if option:
        os.environ[CACHE_ENV] = option
    elif not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[CACHE_ENV] = str(cache_root() / "torch-compile")

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    path = Path(os.environ[CACHE_ENV])
    path.mkdir(parents=True, exist_ok=True)
    return path


class TorchCompiledBackend(TorchEagerBackend):
    """``TorchEagerBackend`` with its UNet and VAE decoder prepared and compiled."""

    name = "torch-compiled"

    def __init__(self, model_dir: Path, settings: BackendSettings) -> None:
        # The eager part gets its own defaults: these options are this backend's, not TorchEagerBackend's.
        super().__init__(model_dir, dataclasses.replace(settings, options=None))
        opts = settings.options if settings.options is not None else TorchCompiledOptions()
        self.compile_options: TorchCompiledOptions = opts
        self.mode = opts.mode if opts.mode != "auto" else ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.cuda_graphs = self.device.type == "cuda" and self.mode in ("reduce-overhead", "max-autotune")
        self.cache_dir = configure_cache(opts.cache_dir) if opts.compiler == "inductor" else None
        self.profile = ShapeProfile.around(load_model_config(model_dir).default_size)
        self._network_descriptors = descriptors_for(model_dir)
        self._prepare_modules()
        log.info(
            "torch-compiled: %s mode, dynamic %s, %s, attention %s%s, %s; compiled artifacts in %s",
            self.mode, opts.dynamic, opts.compiler, "SDPA" if opts.sdpa else "plain",
            " with fused QKV" if opts.fuse_qkv else "", "channels_last" if opts.channels_last else "contiguous",
            self.cache_dir or "memory only", )

    def _prepare_modules(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        opts = self.compile_options
        for module in (self._unet, self._vae):
            if opts.fuse_qkv:
                module.fuse_qkv_projections()  # and sets FusedAttnProcessor2_0 (SDPA)
            else:
                module.set_attn_processor(AttnProcessor2_0() if opts.sdpa else AttnProcessor())
            if opts.channels_last:
                module.to(memory_format=torch.channels_last)
        # The processors set above project keys and values themselves (fused): no precomputed ones.
        self._kv_layers = []
        compile_options = dict(backend=opts.compiler, dynamic=DYNAMIC[opts.dynamic])
        if opts.compiler == "inductor":
            compile_options["mode"] = self.mode
        # In place: the modules keep their type and attributes, and every caller gets the compiled forward.
        self._unet.compile(**compile_options)
        self._vae.decoder.compile(**compile_options)

    # -- CUDA graphs replay into static buffers: each call is a new step, and its output is copied out ----

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return super().unet(sample, timestep, encoder_hidden_states)
        torch.compiler.cudagraph_mark_step_begin()
        return super().unet(sample, timestep, encoder_hidden_states).clone()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return super().vae_decode(latents)
        torch.compiler.cudagraph_mark_step_begin()
        return super().vae_decode(latents).clone()

    # -- warm-up ----------------------------------------------------------------------------------------

    @property
    def warm_up_rows(self) -> dict[str, tuple[int, ...]]:
        """Rows per network that warm-up compiles: the guided UNet's two rows per image for one image and for
        the profile's largest batch (two row counts, so ``dynamic="auto"`` makes rows symbolic before serving),
        and the decoder at one image and at the largest batch."""
        images = self.profile.images
        return {UNET: (2 * images.opt, 2 * images.max), VAE_DECODER: (images.opt, images.max)}

    def warm_up(self) -> None:
        """Compile the UNet and the VAE decoder at the profile's shapes, timing each."""
        height, width = self.profile.height.opt, self.profile.width.opt
        total = time.perf_counter()
        for component, rows_list in self.warm_up_rows.items():
            descriptor = self._network_descriptors[component]
            for rows in rows_list:
                feeds = {name: torch.from_numpy(value).to(self.device)
                         for name, value in descriptor.sample_inputs(rows, height, width).items()}
                started = time.perf_counter()
                if component == UNET:
                    self.unet(feeds["sample"], feeds["timestep"].float(), feeds["encoder_hidden_states"])
                else:
                    self.vae_decode(feeds["latent_sample"])
                log.info("torch-compiled: %s at %d rows, %dx%d: %.1fs", component, rows, width, height,
                         time.perf_counter() - started)
        log.info("torch-compiled: compiled and warmed up in %.1fs (compiled artifacts in %s)",
                 time.perf_counter() - total, self.cache_dir or "memory only")


def warm_up(backend: TorchCompiledBackend) -> None:
    backend.warm_up()


# -- the plug-in ----------------------------------------------------------------------------------


def add_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = TorchCompiledOptions()
    group.add_argument("--compile-mode", default=defaults.mode, choices=COMPILE_MODES,
                       help="torch.compile mode (auto: reduce-overhead, i.e. CUDA graphs, on CUDA; default on the CPU)")
    group.add_argument("--compile-dynamic", default=defaults.dynamic, choices=list(DYNAMIC),
                       help="auto: recompile once with symbolic shapes when the row count first changes (warm-up does "
                       "it); true: symbolic from the start; false: one compile per shape")
    group.add_argument("--compile-backend", default=defaults.compiler,
                       help="torch.compile backend (default: %(default)s)")
    group.add_argument("--no-channels-last", action="store_true", help="keep the modules' default memory format")
    group.add_argument("--no-fuse-qkv", action="store_true", help="keep separate Q, K, V projections")
    group.add_argument("--no-sdpa", action="store_true",
                       help="plain attention instead of scaled_dot_product_attention (needs --no-fuse-qkv)")
    group.add_argument("--compile-cache-dir", default=defaults.cache_dir,
                       help="Inductor's cache of compiled code (default: $TORCHINDUCTOR_CACHE_DIR, else a folder "
                       "under the diffusiond cache)")


def options_from_args(args: argparse.Namespace) -> TorchCompiledOptions:
    return TorchCompiledOptions(
        mode=args.compile_mode,
        dynamic=args.compile_dynamic,
        compiler=args.compile_backend,
        channels_last=not args.no_channels_last,
        fuse_qkv=not args.no_fuse_qkv,
        sdpa=not args.no_sdpa,
        cache_dir=args.compile_cache_dir,
    )


PLUGIN = BackendPlugin(
    name="torch-compiled",
    description="diffusers-format model directories, run by PyTorch with torch.compile, fused QKV, SDPA and "
    "channels_last (compiles at warm-up)",
    load=TorchCompiledBackend,
    options_type=TorchCompiledOptions,
    add_arguments=add_arguments,
    options_from_args=options_from_args,
    warm_up=warm_up,
)
