"""``diffusiond export onnx``: a diffusers-format model -> an ONNX directory in Optimum's layout.

    OUT/
      text_encoder/model.onnx  config.json
      unet/model.onnx          config.json   (+ model.onnx_data when over 2 GB)
      vae_decoder/model.onnx   config.json
      vae_encoder/model.onnx   config.json
      tokenizer/  scheduler/  model_index.json
      manifest.json

Each network is traced with ``torch.onnx.export`` (the TorchScript exporter:
the dynamo exporter took 40x longer on the same UNet and needs onnxscript)
from the wrapper its descriptor names, with the descriptor's input/output names
and dynamic axes, so one file serves every batch size and image size. Then,
by precision: fp16 converts the text encoder and UNet (``fp16.py``); int8
records calibration inputs and quantizes the UNet (``calibration.py``,
``int8.py``). Every written network is run in ONNX Runtime against the PyTorch
original at two batch sizes and two image sizes, and the errors go into the
manifest; an fp32 network that disagrees fails the export.

The export is built in a hidden staging directory next to OUT and swapped in
whole, so OUT is never half-written. A manifest with the same source hash and
options means OUT is up to date, and it is reused unless ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import platform
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusiond.errors import DiffusiondError, FailedPrecondition, InvalidArgument, NotFound
from diffusiond.export import calibration, onnx_io
from diffusiond.export.calibration import CalibrationSettings, capture_unet_inputs
from diffusiond.export.fp16 import Fp16Settings, convert_to_fp16, fp16_components
from diffusiond.export.int8 import Int8Settings, quantize_unet
from diffusiond.export.progress import Progress
from diffusiond.export.staging import staged
from diffusiond.models import latent_rgb
from diffusiond.models.config import SERVING_DEFAULTS_FILE, load_model_config, read_json
from diffusiond.models.descriptors import (
    COMPONENTS,
    CONTROL_COMPONENTS,
    CONTROLNET,
    REQUIRED_COMPONENTS,
    UNET,
    UNET_SHALLOW,
    NetworkDescriptor,
    SDDims,
    ShapeProfile,
    sd_descriptors,
)
from diffusiond.models.lora import AdapterSpec
from diffusiond.models.manifest import (
    MANIFEST_FILE,
    PRECISIONS,
    ComponentEntry,
    Manifest,
    hash_directory,
    missing_files,
    options_key,
    read_manifest,
)

log = logging.getLogger(__name__)

# Bump when the export recipe changes, so existing artifacts are rebuilt rather than reused.
# 3: the UNet is traced and verified with a different timestep in every row (continuous batching
# mixes requests at different steps in one call), so an export that ignored all but row 0's is rebuilt.
RECIPE_VERSION = 4
DEFAULT_OPSET = 17
SOURCE_CONFIG = {
    "text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "unet_shallow": "unet",
    "unet_controlled": "unet",  # controlnet: the ControlNet directory's own config.json
}
CONTROL_CONFIG = "diffusiond_control.json"  # what the ControlNet's control image is, copied beside it
# fp32 networks must match PyTorch to this (absolute, scaled by the output's magnitude when above 1).
FP32_TOLERANCE = 2e-3


class ExportError(DiffusiondError):
    """The export ran but produced a network that does not compute what the source does."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    profile: ShapeProfile | None = None  # None: half to twice the model's native size, 1-4 images
    components: tuple[str, ...] = COMPONENTS
    verify: bool = True
    force: bool = False
    fp16: Fp16Settings = field(default_factory=Fp16Settings)
    int8: Int8Settings = field(default_factory=Int8Settings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    # Step caching: the UNet also returns its deep features at this depth and ``unet_shallow`` is
    # exported beside it (0: neither).
    step_cache_depth: int = 1
    # LoRA adapters fused into the UNet's weights (``--lora NAME:SCALE``); recorded in the manifest.
    loras: tuple[AdapterSpec, ...] = ()
    # A diffusers-format ControlNet directory, exported as ``controlnet`` (its residuals) beside
    # ``unet_controlled`` (the UNet that adds them); the manifest records it under ``controlnet_name``.
    controlnet: str = ""
    controlnet_name: str = ""

    def __post_init__(self) -> None:
        if self.controlnet:
            if not self.controlnet_name:
                object.__setattr__(self, "controlnet_name", Path(self.controlnet).name)
            extra = tuple(c for c in CONTROL_COMPONENTS if c not in self.components)
            object.__setattr__(self, "components", (*self.components, *extra))
        elif any(c in CONTROL_COMPONENTS for c in self.components):
            raise InvalidArgument("components", "the controlnet components need a ControlNet (--controlnet)")
        if not 0 <= self.step_cache_depth <= 8:
            raise InvalidArgument("step_cache_depth", f"must be between 0 and 8, got {self.step_cache_depth}")
        if not self.step_cache_depth:
            if UNET_SHALLOW in self.components and self.components != COMPONENTS:
                raise InvalidArgument("components", f"{UNET_SHALLOW} needs a step-cache depth above 0")
            object.__setattr__(self, "components", tuple(c for c in self.components if c != UNET_SHALLOW))
        if self.precision not in PRECISIONS:
            raise InvalidArgument("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 14 <= self.opset <= 20:
            raise InvalidArgument("opset", f"must be between 14 and 20, got {self.opset}")
        unknown = [c for c in self.components if c not in (*COMPONENTS, *CONTROL_COMPONENTS)]
        missing = [c for c in REQUIRED_COMPONENTS if c not in self.components]
        if unknown or missing:
            raise InvalidArgument(
                "components", f"unknown: {unknown or 'none'}, missing required: {missing or 'none'}"
            )

    def decisive(self, profile: ShapeProfile) -> dict[str, Any]:
        """Every option that changes the artifact's content (its cache key)."""
        data: dict[str, Any] = {
            "recipe": RECIPE_VERSION,
            "precision": self.precision,
            "opset": self.opset,
            "profile": profile.to_json(),
            "components": sorted(self.components),
            "step_cache_depth": self.step_cache_depth,
        }
        if self.loras:
            data["loras"] = fused_adapters_record(self.loras)
        if self.controlnet:
            data["controlnet"] = {"name": self.controlnet_name, "sha256": hash_directory(Path(self.controlnet))[0]}
        if self.precision == "fp16":
            data["fp16"] = self.fp16.to_json()
        if self.precision == "int8":
            data["int8"] = self.int8.to_json()
            data["calibration"] = self.calibration.to_json()
        return data


def fused_adapters_record(loras: tuple[AdapterSpec, ...]) -> list[dict[str, Any]]:
    """What the manifest says of the adapters fused into an export: name, scale, file and its hash."""
    import hashlib

    return [
        {"name": spec.name, "scale": spec.scale, "file": str(spec.path.resolve()),
         "sha256": hashlib.sha256(spec.path.read_bytes()).hexdigest()}
        for spec in loras
    ]


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    reused: bool


def check_source(source: Path) -> None:
    if not source.is_dir():
        raise NotFound(f"source model directory {source} does not exist")
    if (source / "unet" / onnx_io.MODEL_FILE).is_file():
        raise FailedPrecondition(f"{source} is already an ONNX export; give the diffusers-format model it came from")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (source / sub).is_dir():
            raise FailedPrecondition(f"{source} has no {sub}/ directory: not a diffusers-format model")


def _require_tools() -> None:
    from diffusiond.errors import MissingDependency

    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise MissingDependency(package, "ONNX export", "onnx") from None


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("diffusiond", "torch", "onnx", "onnxruntime", "diffusers", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def tested_shapes(descriptor: NetworkDescriptor, profile: ShapeProfile) -> list[tuple[int, int, int]]:
    """Two batch sizes and two image sizes, one of them non-square and not a multiple of 8 latent pixels."""
    f = descriptor.dims.vae_scale_factor
    h, w = profile.height.min, profile.width.min
    return [(1, h, w), (2, h + f, w + 2 * f)]


def export_onnx(source: Path, out: Path, options: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Export ``source`` into ``out`` (or reuse ``out`` when it is up to date)."""
    _require_tools()
    check_source(source)
    options = dataclasses.replace(options, calibration=calibration.for_model(options.calibration, source))
    config = load_model_config(source)
    dims = SDDims.from_model_dir(source)
    profile = options.profile or ShapeProfile.around(config.default_size)
    decisive = options.decisive(profile)
    key = options_key(decisive)
    stages = 2 + len(options.components) + (1 if options.precision == "int8" else 0)
    progress = progress or Progress(stages)

    with progress.stage(f"hashing source model {source}"):
        source_sha, source_bytes = hash_directory(source)
        progress.note("sha256 %s (%.1f MB)", source_sha[:16], source_bytes / 1e6)

    existing = _existing_manifest(out)
    if existing is not None and not options.force:
        if existing.source_sha256 == source_sha and existing.options_key == key and not missing_files(out, existing):
            log.info("%s is up to date (source %s, options %s); pass --force to rebuild", out, source_sha[:12], key)
            return ExportResult(out, existing, reused=True)
    _check_replaceable(out, existing, options.force)

    if options.controlnet and not (Path(options.controlnet) / "config.json").is_file():
        raise NotFound(f"ControlNet directory {options.controlnet} has no config.json (not a diffusers ControlNet)")
    descriptors = sd_descriptors(dims, options.step_cache_depth, control=bool(options.controlnet))
    with staged(out) as staging:
        samples: list | None = None
        calibration_info: dict[str, Any] | None = None
        range_cache: Path | None = None
        if options.precision == "int8":
            range_cache = calibration_cache_file(source_sha, options)
            with progress.stage("calibration: recording UNet inputs while denoising the calibration prompts"):
                counts_file = range_cache.with_suffix(".samples.json")
                if range_cache.is_file() and counts_file.is_file():
                    counts = json.loads(counts_file.read_text())
                    progress.note("reusing activation ranges from %s", range_cache)
                else:
                    range_cache.unlink(missing_ok=True)
                    samples = capture_unet_inputs(source, options.calibration, progress)
                    counts = {"samples": len(samples), "rows": int(sum(s["sample"].shape[0] for s in samples))}
                    range_cache.parent.mkdir(parents=True, exist_ok=True)
                    counts_file.write_text(json.dumps(counts))
                calibration_info = {**options.calibration.to_json(), **counts}
                progress.note("%d UNet calls (%d rows, both guidance halves)", counts["samples"], counts["rows"])

        vae_upcast = bool(read_json(source / "vae" / "config.json").get("force_upcast", True))
        # fp16 converts the UNet's shallow pass with it; int8 quantizes the full UNet only (the shallow pass is cheap).
        converted = (*fp16_components(vae_upcast), UNET_SHALLOW) if options.precision == "fp16" else (
            (UNET,) if options.precision == "int8" else ()
        )
        components: dict[str, ComponentEntry] = {}
        for name in options.components:
            precision = options.precision if name in converted else "fp32"
            with progress.stage(f"{name}: export ({precision})"):
                components[name] = _export_component(
                    source, staging, descriptors[name], precision, options, profile, samples, progress, range_cache
                )
        if calibration_info is not None:
            calibration_info["quantization"] = components[UNET].notes.get("int8", {})

        with progress.stage("configs, tokenizer, scheduler and manifest"):
            _copy_configs(source, staging, options.components, Path(options.controlnet) if options.controlnet else None,
                          options.controlnet_name)
            manifest = Manifest(
                precision=options.precision,
                opset=options.opset,
                source={"path": str(source.resolve()), "sha256": source_sha, "bytes": source_bytes},
                components=components,
                options=decisive,
                options_key=key,
                profile=profile.to_json(),
                versions=tool_versions(),
                calibration=calibration_info,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timings_s={k: round(v, 2) for k, v in progress.durations.items()},
                adapters=decisive.get("loras", []),
            )
            manifest.write(staging)
    total = sum(c.bytes for c in manifest.components.values())
    log.info("exported %s -> %s (%s, %.1f MB) in %.1fs", source, out, options.precision, total / 1e6, progress.elapsed)
    return ExportResult(out, manifest, reused=False)


def calibration_cache_file(source_sha: str, options: ExportOptions) -> Path:
    """Where the activation ranges for this source and these calibration/quantized-op settings are kept.

    Ranges depend on the source, the calibration settings, the exported graph (recipe, opset) and
    which tensors are quantized, not on the quantized types, so every INT8 variant of one model
    (formats, type pairs, per-channel or not) calibrates once.
    """
    from diffusiond.models.builtin import cache_root

    key = options_key({
        "recipe": RECIPE_VERSION,
        "opset": options.opset,
        "calibration": options.calibration.to_json(),
        "op_types": sorted(options.int8.op_types),
        "kept": sorted(options.int8.keep_fp32_modules),
    })
    return cache_root() / "calibration" / f"{source_sha[:16]}-{key}.json"


def _existing_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        return read_manifest(out)
    except FailedPrecondition as exc:
        log.warning("ignoring the existing manifest: %s", exc)
        return None


def _check_replaceable(out: Path, existing: Manifest | None, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FailedPrecondition(f"output {out} exists and is a file")
    if existing is not None or not any(out.iterdir()):
        return
    looks_like_export = (out / "model_index.json").is_file() and (out / "unet").is_dir()
    if not looks_like_export:
        raise FailedPrecondition(f"output {out} is a non-empty directory that holds no export; choose another --out")
    if not force:
        raise FailedPrecondition(f"output {out} holds a model without a diffusiond manifest; pass --force to replace it")


@contextlib.contextmanager
def _quiet_tracing():
    """The tracer's warnings about Python branches on shapes are expected here (see _trace_size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trace_size(descriptor: NetworkDescriptor, profile: ShapeProfile) -> tuple[int, int, int]:
    """Batch and size to trace at.

    The UNet is traced at a latent size that is not a multiple of its total
    downsampling, so diffusers takes its ``upsample_size`` branch, which sizes
    each upsampling from the skip connection's runtime shape: the traced graph
    then serves every latent size, not only multiples of 8.
    """
    f = descriptor.dims.vae_scale_factor
    return 2, profile.height.min + f, profile.width.min + f


def _export_component(
    source: Path,
    staging: Path,
    descriptor: NetworkDescriptor,
    precision: str,
    options: ExportOptions,
    profile: ShapeProfile,
    samples: list | None,
    progress: Progress,
    range_cache: Path | None = None,
) -> ComponentEntry:
    import torch

    from diffusiond.export.torch_modules import load_torch_network

    name = descriptor.name
    target = staging / name / onnx_io.MODEL_FILE
    module = load_torch_network(source, name, descriptor.step_cache_depth, options.loras,
                                Path(options.controlnet) if options.controlnet else None)
    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=staging) as tmp:
        raw = Path(tmp) / onnx_io.MODEL_FILE
        batch, height, width = _trace_size(descriptor, profile)
        sample = descriptor.sample_inputs(batch, height, width)
        args = tuple(torch.from_numpy(sample[n]) for n in descriptor.input_names)
        with _quiet_tracing(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                input_names=descriptor.input_names,
                output_names=descriptor.output_names,
                dynamic_axes=descriptor.dynamic_axes(),
                opset_version=options.opset,
                do_constant_folding=True,
            )
        model = onnx_io.load_model(raw)
        external = onnx_io.weight_bytes(model) > onnx_io.EXTERNAL_DATA_THRESHOLD
        files = onnx_io.save_model(model, target, external=external)
        fp32_bytes = onnx_io.files_bytes(files)
        progress.note("%s fp32: %.1f MB%s", name, fp32_bytes / 1e6, " (external data)" if external else "")

        if precision == "fp16":
            if external:  # in-memory shape inference stops at 2 GB: infer on the files instead
                import onnx

                del model
                inferred = target.with_name("inferred.onnx")  # beside its external data, which it names
                onnx.shape_inference.infer_shapes_path(str(target), str(inferred))
                model = onnx_io.load_model(inferred)
                inferred.unlink()
            fp16_model = convert_to_fp16(model, options.fp16, shapes_inferred=external)
            del model
            files = onnx_io.save_model(fp16_model, target, external=onnx_io.weight_bytes(fp16_model) > onnx_io.EXTERNAL_DATA_THRESHOLD)
            del fp16_model
            notes["fp16"] = {**options.fp16.to_json(), "fp32_bytes": fp32_bytes}
        elif precision == "int8":
            del model
            quantized = Path(tmp) / "int8.onnx"
            info = quantize_unet(target, quantized, samples or [], options.int8, options.calibration,
                                 use_external_data=external, range_cache=range_cache)
            int8_model = onnx_io.load_model(quantized)
            for old in files:
                old.unlink()
            files = onnx_io.save_model(int8_model, target, external=onnx_io.weight_bytes(int8_model) > onnx_io.EXTERNAL_DATA_THRESHOLD)
            del int8_model
            notes["int8"] = {**info, "fp32_bytes": fp32_bytes}
        else:
            del model
    size = onnx_io.files_bytes(files)
    if precision != "fp32":
        progress.note("%s %s: %.1f MB (%.0f%% of fp32)", name, precision, size / 1e6, 100 * size / fp32_bytes)
    tested = _verify(module, descriptor, target, profile, precision) if options.verify else []
    del module
    return ComponentEntry(
        precision=precision,
        files=[f.relative_to(staging).as_posix() for f in files],
        bytes=size,
        io=descriptor.to_json(profile),
        tested=tested,
        notes=notes,
    )


def _verify(module, descriptor: NetworkDescriptor, path: Path, profile: ShapeProfile, precision: str) -> list[dict[str, Any]]:
    """Run the written network in ONNX Runtime against PyTorch; fail an fp32 export that disagrees."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results = []
    for batch, height, width in tested_shapes(descriptor, profile):
        feeds = descriptor.sample_inputs(batch, height, width, seed=1)
        with torch.inference_mode():
            expected = module(*(torch.from_numpy(feeds[n]) for n in descriptor.input_names))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, feeds)
        errors, scales = [], []
        for want, have, spec in zip(expected, got, descriptor.outputs):
            want_np = want.float().numpy()
            if have.shape != want_np.shape:
                raise ExportError(f"{descriptor.name}: output {spec.name} has shape {have.shape}, expected {want_np.shape}")
            errors.append(float(np.abs(have.astype(np.float32) - want_np).max()))
            scales.append(float(np.abs(want_np).max()))
        record = {
            "batch": batch, "height": height, "width": width,
            "max_abs_error": max(errors), "output_max_abs": max(scales),
        }
        results.append(record)
        if precision == "fp32" and max(errors) > FP32_TOLERANCE * max(1.0, max(scales)):
            raise ExportError(
                f"{descriptor.name}: ONNX Runtime and PyTorch disagree at batch {batch}, {width}x{height}: "
                f"max abs error {max(errors):.2e} (outputs up to {max(scales):.2f})"
            )
        if not all(np.isfinite(g).all() for g in got):
            raise ExportError(f"{descriptor.name} ({precision}) produced non-finite outputs at batch {batch}, {width}x{height}")
    return results


def _copy_configs(
    source: Path, staging: Path, components: tuple[str, ...], controlnet: Path | None = None, controlnet_name: str = ""
) -> None:
    for name in components:
        if name == CONTROLNET and controlnet is not None:
            shutil.copy2(controlnet / "config.json", staging / name / "config.json")
            source_control = controlnet / CONTROL_CONFIG
            control = json.loads(source_control.read_text()) if source_control.is_file() else {}
            control["name"] = controlnet_name  # the name it is served under, wherever the export goes
            (staging / name / CONTROL_CONFIG).write_text(json.dumps(control, indent=2) + "\n")
            continue
        shutil.copy2(source / SOURCE_CONFIG[name] / "config.json", staging / name / "config.json")
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(source / sub, staging / sub)
    # The model's own sampling defaults and preview projection travel with it, so an export serves what
    # the source serves.
    for name in (SERVING_DEFAULTS_FILE, latent_rgb.MODEL_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
