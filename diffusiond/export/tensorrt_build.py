"""``diffusiond export tensorrt``: an ONNX export -> TensorRT engines for the GPU it runs on.

    OUT/
      text_encoder/model.plan  config.json
      unet/model.plan          config.json
      vae_decoder/model.plan   config.json
      vae_encoder/model.plan   config.json      (image inputs; see ``vae_encoder`` below)
      tokenizer/  scheduler/  model_index.json
      manifest.json            (format "diffusiond-tensorrt")

An engine is compiled for one GPU architecture (compute capability) and one
TensorRT version, and for the (min, opt, max) input shapes of its optimisation
profile. All three go into the manifest, and the tensorrt backend refuses an
engine whose manifest does not match the machine, or a request outside the
profile, with FAILED_PRECONDITION saying why.

Precision comes from the ONNX export, not from builder flags. Networks are
built strongly typed: TensorRT keeps every tensor type the export chose, so an
fp16 export gives fp16 engines with the same fp32 islands (normalisations, the
timestep embedding, the whole VAE when its config asks for ``force_upcast``),
and an INT8 (QDQ) export gives explicitly quantized INT8 layers with the rest
in fp32, exactly what the ONNX Runtime backend runs. TensorRT deprecated the
weakly typed FP16/INT8 builder flags in 10.12 and removed them in 11, so this
is also the only form that builds on both. The one builder flag set here is
TF32, cleared for fp32 engines so they stay close to the PyTorch reference.

The VAE encoder serves image inputs (img2img, inpainting, the Lanczos hi-res
upscaler) and nothing else, so building it is the operator's choice
(``--vae-encoder``): ``auto`` builds it when the ONNX export has it, ``build``
requires it (refusing an export without one), ``skip`` leaves it out (engines
for text to image only; the server then reports no img2img).

The profiles come from the model descriptors (``models/descriptors.py``), the
same contract the ONNX export was made from; the manifest and the machine
checks are in ``models/tensorrt_artifact.py``, which the backend reads too.

Planning (which files, precision, flags and profiles) is plain Python and
unit-tested; building needs TensorRT and a CUDA GPU, and is imported only then.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffusiond.errors import FailedPrecondition, InvalidArgument, NotFound
from diffusiond.export.progress import Progress
from diffusiond.export.staging import staged
from diffusiond.models import latent_rgb
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    COMPONENTS,
    CONTROL_COMPONENTS,
    REQUIRED_COMPONENTS,
    UNET,
    UNET_SHALLOW,
    VAE_ENCODER,
    ShapeProfile,
    descriptors_for,
)
from diffusiond.models.manifest import (
    Manifest,
    hash_directory,
    infer_precision,
    options_key,
    read_manifest,
)
from diffusiond.models.tensorrt_artifact import (
    ENGINE_FILE,
    MANIFEST_FILE,
    EngineManifest,
    MachineInfo,
    compatibility_problems,
    import_tensorrt,
    missing_engines,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
# Bump when the build recipe changes, so existing engines are rebuilt rather than reused.
RECIPE_VERSION = 1
NETWORK_FLAGS = ("STRONGLY_TYPED",)
VAE_ENCODER_CHOICES = ("auto", "build", "skip")


@dataclass(frozen=True)
class EngineBuildOptions:
    precision: str = ""  # "": whatever the ONNX export holds; otherwise the export must hold this
    profile: ShapeProfile | None = None  # None: the ONNX export's own profile
    # Step caching's shallow UNet is not built: the tensorrt backend does not cache steps.
    components: tuple[str, ...] = tuple(c for c in COMPONENTS if c != UNET_SHALLOW)
    workspace_gib: float = 8.0
    optimization_level: int = 3  # TensorRT's builder optimisation level, 0-5
    force: bool = False
    device: str = "cuda"
    # Also build the ONNX export's ControlNet pair (controlnet, unet_controlled); the export must hold it.
    controlnet: bool = False
    vae_encoder: str = "auto"  # auto: when the export has it; build: required; skip: never (no image inputs)

    def __post_init__(self) -> None:
        if self.controlnet:
            extra = tuple(c for c in CONTROL_COMPONENTS if c not in self.components)
            object.__setattr__(self, "components", (*self.components, *extra))
        if self.vae_encoder not in VAE_ENCODER_CHOICES:
            raise InvalidArgument(
                "vae_encoder", f"{self.vae_encoder!r} is not one of {', '.join(VAE_ENCODER_CHOICES)}"
            )
        if self.precision and self.precision not in PRECISIONS:
            raise InvalidArgument("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.optimization_level <= 5:
            raise InvalidArgument("optimization_level", f"must be between 0 and 5, got {self.optimization_level}")
        if self.workspace_gib <= 0:
            raise InvalidArgument("workspace_gib", f"must be positive, got {self.workspace_gib}")
        unknown = [c for c in self.components if c not in (*COMPONENTS, *CONTROL_COMPONENTS)]
        if unknown:
            raise InvalidArgument("components", f"unknown: {', '.join(unknown)}")
        missing = [c for c in REQUIRED_COMPONENTS if c not in self.components]
        if missing:
            raise InvalidArgument("components", f"missing required: {', '.join(missing)}")


Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class EnginePlan:
    """How one network's engine is built: from which file, with which flags, for which shapes."""

    component: str
    onnx_file: Path
    precision: str  # the ONNX component's own precision (an fp16 export keeps an upcast VAE in fp32)
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    cleared_flags: tuple[str, ...]  # BuilderFlag names to clear
    input_profile: dict[str, Shapes]  # input name -> (min, opt, max) shape

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "network_flags": list(self.network_flags),
            "cleared_flags": list(self.cleared_flags),
            "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in self.input_profile.items()},
        }


@dataclass(frozen=True)
class BuildPlan:
    precision: str
    profile: ShapeProfile
    engines: list[EnginePlan]


def export_precision(onnx_dir: Path, manifest: Manifest | None) -> str:
    """The ONNX export's precision: its manifest's, or judged from the UNet graph (e.g. Optimum exports)."""
    if manifest is not None:
        return manifest.precision
    return infer_precision(onnx_dir / UNET / ONNX_FILE)


def plan_engines(onnx_dir: Path, options: EngineBuildOptions) -> BuildPlan:
    """Check the ONNX export and decide every engine's build; raise saying what is wrong."""
    if not (onnx_dir / UNET / ONNX_FILE).is_file():
        hint = " (a diffusers-format model: export it with `diffusiond export onnx` first)" if (onnx_dir / UNET).is_dir() else ""
        raise NotFound(f"{onnx_dir} holds no {UNET}/{ONNX_FILE}: not an ONNX export{hint}")
    onnx_manifest = read_manifest(onnx_dir)
    precision = export_precision(onnx_dir, onnx_manifest)
    if options.precision and options.precision != precision:
        raise FailedPrecondition(_precision_mismatch(onnx_dir, options.precision, precision))
    if precision == "int8" and onnx_manifest is not None:
        problems = int8_problems(onnx_manifest.options.get("int8", {}))
        if problems:
            raise FailedPrecondition(
                f"{onnx_dir} is an INT8 export TensorRT cannot build: {'; '.join(problems)}; "
                "re-export with the defaults (`diffusiond export onnx --precision int8`)"
            )
    if options.profile is not None:
        profile = options.profile
    elif onnx_manifest is not None:
        profile = ShapeProfile.from_json(onnx_manifest.profile)
    else:
        profile = ShapeProfile.around(load_model_config(onnx_dir).default_size)

    descriptors = descriptors_for(onnx_dir)
    engines = []
    for component in options.components:
        path = onnx_dir / component / ONNX_FILE
        if component == VAE_ENCODER and options.vae_encoder == "skip":
            continue
        if not path.is_file():
            if component in REQUIRED_COMPONENTS:
                raise NotFound(f"{onnx_dir} has no {component}/{ONNX_FILE}: not a complete ONNX export")
            if component in CONTROL_COMPONENTS:
                raise NotFound(
                    f"{onnx_dir} has no {component}/{ONNX_FILE}: a ControlNet engine was asked for, but the ONNX "
                    "export holds none (export it with `diffusiond export onnx --controlnet NAME=DIR`)"
                )
            if component == VAE_ENCODER and options.vae_encoder == "build":
                raise NotFound(
                    f"{onnx_dir} has no {VAE_ENCODER}/{ONNX_FILE}, which image inputs need; export it with "
                    "`diffusiond export onnx` (which writes the encoder), or build with --vae-encoder skip"
                )
            continue
        entry = onnx_manifest.components.get(component) if onnx_manifest is not None else None
        engines.append(
            EnginePlan(
                component=component,
                onnx_file=path,
                precision=entry.precision if entry is not None else precision,
                network_flags=NETWORK_FLAGS,
                cleared_flags=("TF32",) if precision == "fp32" else (),
                input_profile=descriptors[component].input_profile(profile),
            )
        )
    return BuildPlan(precision, profile, engines)


def _precision_mismatch(onnx_dir: Path, wanted: str, held: str) -> str:
    if wanted == "int8":
        return (
            f"int8 engines are built from an INT8 (QDQ) ONNX export, but {onnx_dir} is a {held} export; "
            "export with `diffusiond export onnx --precision int8` first"
        )
    return (
        f"{wanted} engines are built from a {wanted} ONNX export (TensorRT keeps the export's types), "
        f"but {onnx_dir} is a {held} export; export with `diffusiond export onnx --precision {wanted}`, "
        f"or leave out --precision to build {held} engines"
    )


def int8_problems(settings: dict[str, Any]) -> list[str]:
    """Why TensorRT cannot run an INT8 export made with these settings (its manifest's ``options.int8``)."""
    problems = []
    if settings.get("format", "QDQ") != "QDQ":
        problems.append(f"its format is {settings['format']}, and TensorRT takes QDQ (QuantizeLinear/DequantizeLinear)")
    for key in ("activation_type", "weight_type"):
        if settings.get(key, "int8") != "int8":
            problems.append(f"its {key.replace('_', ' ')} is {settings[key]}, and TensorRT takes signed int8")
    if not settings.get("symmetric_activations", True):
        problems.append("its activations are asymmetric, and TensorRT needs zero points of 0")
    return problems


def build_engines(
    onnx_dir: Path, out: Path, options: EngineBuildOptions, progress: Progress | None = None
) -> tuple[EngineManifest, bool]:
    """Build (or reuse, when up to date for this machine) the engines; return (manifest, reused)."""
    plan = plan_engines(onnx_dir, options)
    if out.resolve() == onnx_dir.resolve():
        raise InvalidArgument("out", f"{out} is the ONNX export itself; write the engines to another directory")
    existing = _existing_manifest(out)
    machine = MachineInfo.current(options.device)
    progress = progress or Progress(2 + len(plan.engines))
    with progress.stage(f"hashing ONNX export {onnx_dir}"):
        onnx_sha, _ = hash_directory(onnx_dir)
    decisive = {
        "recipe": RECIPE_VERSION,
        "precision": plan.precision,
        "profile": plan.profile.to_json(),
        "components": [p.component for p in plan.engines],
        "workspace_gib": options.workspace_gib,
        "optimization_level": options.optimization_level,
    }
    key = options_key(decisive)
    if existing is not None and not options.force:
        same_machine = not compatibility_problems(existing, machine)[0]
        same_source = existing.source.get("sha256") == onnx_sha
        if existing.options_key == key and same_source and same_machine and not missing_engines(out, existing):
            log.info("%s is up to date for this GPU; pass --force to rebuild", out)
            return existing, True

    import torch

    trt = import_tensorrt()
    onnx_manifest = read_manifest(onnx_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    components: dict[str, dict[str, Any]] = {}
    with staged(out) as staging, torch.cuda.device(torch.device(options.device)):
        for engine_plan in plan.engines:
            with progress.stage(f"{engine_plan.component}: TensorRT engine ({engine_plan.precision})"):
                engine = _build_one(trt, logger, engine_plan, options)
                target = staging / engine_plan.component / ENGINE_FILE
                target.parent.mkdir(parents=True)
                target.write_bytes(engine)
                shutil.copy2(onnx_dir / engine_plan.component / "config.json", target.parent / "config.json")
                control_config = onnx_dir / engine_plan.component / "diffusiond_control.json"  # the ControlNet's name
                if control_config.is_file():
                    shutil.copy2(control_config, target.parent / control_config.name)
                components[engine_plan.component] = {
                    "file": f"{engine_plan.component}/{ENGINE_FILE}",
                    "bytes": len(engine),
                    **engine_plan.to_json(),
                }
        with progress.stage("configs, tokenizer, scheduler and manifest"):
            for sub in ("tokenizer", "scheduler"):
                shutil.copytree(onnx_dir / sub, staging / sub)
            shutil.copy2(onnx_dir / "model_index.json", staging / "model_index.json")
            if (onnx_dir / latent_rgb.MODEL_FILE).is_file():  # the preview projection fitted to its VAE
                shutil.copy2(onnx_dir / latent_rgb.MODEL_FILE, staging / latent_rgb.MODEL_FILE)
            manifest = EngineManifest(
                precision=plan.precision,
                machine=asdict(machine),
                source={
                    "path": str(onnx_dir.resolve()),
                    "sha256": onnx_sha,
                    "onnx_precision": onnx_manifest.precision if onnx_manifest else plan.precision,
                    "model_sha256": onnx_manifest.source_sha256 if onnx_manifest else "",
                    # LoRA adapters the ONNX export fused into its UNet, and so into these engines.
                    "adapters": onnx_manifest.adapters if onnx_manifest else [],
                },
                components=components,
                profile=plan.profile.to_json(),
                options=decisive,
                options_key=key,
                versions=_versions(trt),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timings_s={k: round(v, 2) for k, v in progress.durations.items()},
            )
            manifest.write(staging)
    return manifest, False


def _existing_manifest(out: Path) -> EngineManifest | None:
    """The manifest of the engines already at ``out``; refuse to replace anything that is not such engines."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FailedPrecondition(f"output {out} exists and is a file")
    if not any(out.iterdir()):
        return None
    if not (out / MANIFEST_FILE).is_file():
        raise FailedPrecondition(f"output {out} is a non-empty directory that holds no TensorRT engines; choose another --out")
    return EngineManifest.read(out)  # another kind of artifact (an ONNX export...) is refused here


def _build_one(trt, logger, plan: EnginePlan, options: EngineBuildOptions) -> bytes:
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_file)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FailedPrecondition(f"TensorRT could not parse {plan.onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    for name in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in plan.input_profile:
            raise FailedPrecondition(
                f"{plan.onnx_file}: input {tensor.name} is not one diffusiond feeds "
                f"(expected {', '.join(plan.input_profile)})"
            )
        if any(d < 0 for d in tensor.shape):  # only dynamic inputs take a profile
            profile.set_shape(tensor.name, *plan.input_profile[tensor.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FailedPrecondition(f"TensorRT failed to build an engine for {plan.component}; see its log above")
    return bytes(serialized)


def _versions(trt) -> dict[str, str]:
    import torch

    return {"tensorrt": trt.__version__, "torch": torch.__version__, "cuda": str(torch.version.cuda)}
