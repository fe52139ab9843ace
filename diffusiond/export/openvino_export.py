"""``diffusiond export openvino``: a diffusers-format model -> OpenVINO IR, fp32 or with an INT8 UNet.

    OUT/
      text_encoder/openvino_model.xml  openvino_model.bin  config.json
      unet/openvino_model.xml          openvino_model.bin  config.json
      vae_decoder/...  vae_encoder/...
      tokenizer/  scheduler/  model_index.json
      manifest.json                    (format diffusiond-openvino)

The layout is Optimum-Intel's. The networks come from an fp32 ONNX export, made
on the way or given (``onnx_export``: traced with the descriptors' names and dynamic
axes, and verified against PyTorch), converted with ``openvino.convert_model``
and saved with fp32 weights; each IR is then run in OpenVINO at fp32 against
that ONNX file in ONNX Runtime, and an IR that disagrees fails the export.

INT8 quantizes the UNet with NNCF's post-training quantization, calibrated on
the same data the ONNX INT8 export uses (``calibration.capture_unet_inputs``:
every UNet call while the fp32 PyTorch pipeline denoises the calibration
prompts, both guidance halves), with NNCF's transformer model type and the
layers NVIDIA's recipe keeps in higher precision left out (``int8.KEEP_FP32_MODULES``).
It is done here, once, rather than when a backend loads: calibration runs the
PyTorch pipeline, which serving should not pay for at every start, and
backends may not import export code. The text encoder and the VAE stay fp32.

The export is written in a staging directory and swapped in whole; a manifest
with the same source hash and options means OUT is up to date, reused unless
``force``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusiond.errors import FailedPrecondition, InvalidArgument, MissingDependency
from diffusiond.export import calibration
from diffusiond.export.calibration import CalibrationSettings, capture_unet_inputs
from diffusiond.export.int8 import KEEP_FP32_MODULES
from diffusiond.export.onnx_export import (
    ExportError,
    ExportOptions,
    _check_replaceable,
    check_source,
    export_onnx,
    tested_shapes,
    tool_versions,
)
from diffusiond.export.progress import Progress
from diffusiond.export.staging import staged
from diffusiond.models.config import load_model_config
from diffusiond.models.descriptors import (
    COMPONENTS,
    UNET,
    UNET_SHALLOW,
    NetworkDescriptor,
    SDDims,
    ShapeProfile,
    sd_descriptors,
)
from diffusiond.models.manifest import (
    OPENVINO_FORMAT,
    ComponentEntry,
    Manifest,
    hash_directory,
    missing_files,
    options_key,
    read_manifest,
)

log = logging.getLogger(__name__)

# Bump when the recipe changes, so existing artifacts are rebuilt rather than reused.
RECIPE_VERSION = 1
IR_FILE = "openvino_model.xml"
PRECISIONS = ("fp32", "int8")
PRESETS = ("mixed", "performance")
# An fp32 IR must match the ONNX file it came from to this (absolute, scaled by the output's
# magnitude when above 1): both compute in fp32, only kernel choices differ.
FP32_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NncfSettings:
    """NNCF post-training quantization of the UNet."""

    # "mixed": symmetric weights, asymmetric activations (NNCF's default for transformers);
    # "performance": symmetric both.
    preset: str = "mixed"
    fast_bias_correction: bool = True
    keep_fp32_modules: tuple[str, ...] = KEEP_FP32_MODULES

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise InvalidArgument("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")

    def to_json(self) -> dict[str, object]:
        return {
            "tool": "nncf.quantize",
            "model_type": "transformer",
            "preset": self.preset,
            "fast_bias_correction": self.fast_bias_correction,
            "kept_fp32_modules": list(self.keep_fp32_modules),
        }


@dataclass(frozen=True)
class OpenVinoExportOptions:
    precision: str = "fp32"  # "fp32", or "int8" (the UNet; the rest stays fp32)
    opset: int = 17  # of the ONNX export made on the way
    profile: ShapeProfile | None = None  # None: half to twice the model's native size, 1-4 images
    # No step-caching pair: the openvino backend does not cache steps.
    components: tuple[str, ...] = tuple(c for c in COMPONENTS if c != UNET_SHALLOW)
    verify: bool = True
    force: bool = False
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    nncf: NncfSettings = field(default_factory=NncfSettings)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidArgument("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)} "
                                  "(bf16 is chosen when serving: --ov-precision-hint bf16)")

    def onnx_options(self) -> ExportOptions:
        """The fp32 ONNX export the IR is converted from."""
        return ExportOptions(precision="fp32", opset=self.opset, profile=self.profile, components=self.components,
                             verify=self.verify, step_cache_depth=0)

    def decisive(self, profile: ShapeProfile) -> dict[str, Any]:
        data: dict[str, Any] = {
            "recipe": RECIPE_VERSION,
            "onnx": self.onnx_options().decisive(profile),
            "precision": self.precision,
        }
        if self.precision == "int8":
            capture = self.calibration.to_json()
            for unused in ("method", "percentile"):  # ONNX Runtime's range settings: NNCF has its own
                capture.pop(unused)
            data["calibration"] = capture
            data["nncf"] = self.nncf.to_json()
        return data


@dataclass
class OpenVinoExportResult:
    directory: Path
    manifest: Manifest
    reused: bool


def import_openvino(precision: str):
    try:
        import openvino
    except ImportError:
        raise MissingDependency("openvino", "OpenVINO export", "openvino") from None
    if precision == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise MissingDependency("nncf", "OpenVINO INT8 export", "openvino") from None
    return openvino


def export_openvino(
    source: Path, out: Path, options: OpenVinoExportOptions, progress: Progress | None = None,
    onnx_dir: Path | None = None,
) -> OpenVinoExportResult:
    """Export ``source`` into ``out`` as OpenVINO IR (or reuse ``out`` when it is up to date).

    ``onnx_dir``: an fp32 ONNX export of ``source`` (its manifest says so) to convert, instead of exporting
    one on the way."""
    ov = import_openvino(options.precision)
    check_source(source)
    options = dataclasses.replace(options, calibration=calibration.for_model(options.calibration, source))
    profile = options.profile or ShapeProfile.around(load_model_config(source).default_size)
    decisive = options.decisive(profile)
    key = options_key(decisive)
    int8 = options.precision == "int8"
    progress = progress or Progress(4 + int(options.verify) + (2 if int8 else 0))

    with progress.stage(f"hashing source model {source}"):
        source_sha, source_bytes = hash_directory(source)
        progress.note("sha256 %s (%.1f MB)", source_sha[:16], source_bytes / 1e6)
    existing = read_manifest(out) if (out / "manifest.json").is_file() else None
    if existing is not None and existing.format == OPENVINO_FORMAT and not options.force:
        if existing.source_sha256 == source_sha and existing.options_key == key and not missing_files(out, existing):
            log.info("%s is up to date (source %s, options %s); pass --force to rebuild", out, source_sha[:12], key)
            return OpenVinoExportResult(out, existing, reused=True)
    _check_replaceable(out, existing, options.force)

    descriptors = sd_descriptors(SDDims.from_model_dir(source))
    given = onnx_dir
    if given is not None:
        _check_onnx_source(given, source_sha, options)
    with staged(out) as staging:
        with progress.stage("fp32 ONNX export to convert from"):
            if given is None:
                onnx_dir = staging / ".onnx"  # hidden: left out of hashes, removed before the swap
                onnx_manifest = export_onnx(source, onnx_dir, options.onnx_options()).manifest
            else:
                onnx_dir = given
                onnx_manifest = read_manifest(given)
                progress.note("converting %s", given)
        assert onnx_dir is not None and onnx_manifest is not None
        calibration_info: dict[str, Any] | None = None
        samples: list[dict[str, np.ndarray]] = []
        if int8:
            with progress.stage("calibration: recording UNet inputs while denoising the calibration prompts"):
                samples = capture_unet_inputs(source, options.calibration, progress)
                calibration_info = {**decisive["calibration"], "samples": len(samples),
                                    "rows": int(sum(s["sample"].shape[0] for s in samples))}
                progress.note("%d UNet calls (%d rows, both guidance halves)", calibration_info["samples"],
                              calibration_info["rows"])

        components: dict[str, ComponentEntry] = {}
        with progress.stage("convert to OpenVINO IR"):
            for name in options.components:
                model = ov.convert_model(str(onnx_dir / name / "model.onnx"))
                notes: dict[str, Any] = {"onnx_bytes": onnx_manifest.components[name].bytes}
                precision = "fp32"
                if int8 and name == UNET:
                    with progress.stage("unet: NNCF INT8 quantization"):
                        model, notes["int8"] = quantize_unet(model, samples, options.nncf)
                    precision = "int8"
                target = staging / name / IR_FILE
                ov.save_model(model, str(target), compress_to_fp16=False)
                files = [target, target.with_suffix(".bin")]
                size = sum(f.stat().st_size for f in files)
                progress.note("%s %s: %.1f MB", name, precision, size / 1e6)
                components[name] = ComponentEntry(
                    precision=precision, files=[f.relative_to(staging).as_posix() for f in files], bytes=size,
                    io=descriptors[name].to_json(profile), notes=notes,
                )
        if options.verify:
            with progress.stage("verify each IR in OpenVINO against its ONNX file in ONNX Runtime"):
                for name, entry in components.items():
                    entry.tested = verify(ov, staging / entry.model_file, onnx_dir / name / "model.onnx",
                                          descriptors[name], profile, entry.precision)
        with progress.stage("configs, tokenizer, scheduler and manifest"):
            for item in onnx_dir.iterdir():  # configs, tokenizer, scheduler, model_index, serving defaults
                if item.is_dir():
                    shutil.copytree(item, staging / item.name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data"))
                elif item.name != "manifest.json":
                    shutil.copy2(item, staging / item.name)
            if given is None:
                shutil.rmtree(onnx_dir)
            versions = tool_versions()
            versions.update(_versions("openvino", *(("nncf",) if int8 else ())))
            manifest = Manifest(
                precision=options.precision,
                opset=options.opset,
                source={"path": str(source.resolve()), "sha256": source_sha, "bytes": source_bytes},
                components=components,
                options=decisive,
                options_key=key,
                profile=profile.to_json(),
                versions=versions,
                exporter="openvino.convert_model of a verified fp32 ONNX export",
                calibration=calibration_info,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timings_s={k: round(v, 2) for k, v in progress.durations.items()},
                format=OPENVINO_FORMAT,
                adapters=list(onnx_manifest.adapters),  # LoRA adapters fused into the ONNX export it converts
            )
            manifest.write(staging)
    log.info("exported %s -> %s (OpenVINO IR, %s) in %.1fs", source, out, options.precision, progress.elapsed)
    return OpenVinoExportResult(out, manifest, reused=False)


def _check_onnx_source(onnx_dir: Path, source_sha: str, options: OpenVinoExportOptions) -> None:
    """FailedPrecondition unless ``onnx_dir`` is a complete fp32 ONNX export of this source."""
    manifest = read_manifest(onnx_dir)
    if manifest is None or manifest.format == OPENVINO_FORMAT:
        raise FailedPrecondition(f"{onnx_dir} is not an ONNX export with a diffusiond manifest")
    problems = []
    if manifest.precision != "fp32":
        problems.append(f"it holds {manifest.precision} networks, and OpenVINO IR is converted from fp32 ones")
    if manifest.source_sha256 != source_sha:
        problems.append(f"it was exported from another model (source sha256 {manifest.source_sha256[:16]}, "
                        f"not {source_sha[:16]})")
    absent = [c for c in options.components if c not in manifest.components]
    if absent:
        problems.append(f"it has no {', '.join(absent)}")
    problems += [f"{m}" for m in missing_files(onnx_dir, manifest)]
    if problems:
        raise FailedPrecondition(f"cannot convert {onnx_dir}: {'; '.join(problems)}")


def modules_nodes(model, modules: tuple[str, ...]) -> list[str]:
    """Names of the operations inside any module named in ``modules`` (ONNX node names carry the module
    path, ``/model/down_blocks.0/resnets.0/time_emb_proj/Gemm``, and OpenVINO keeps them)."""
    wanted = set(modules)
    return [op.get_friendly_name() for op in model.get_ordered_ops() if wanted & set(op.get_friendly_name().split("/"))]


def quantize_unet(model, samples: list[dict[str, np.ndarray]], settings: NncfSettings):
    """The UNet with INT8 weights and activations (NNCF), and what was done, for the manifest."""
    import nncf

    if not samples:
        raise InvalidArgument("calibration", "no calibration samples were recorded")
    nncf.set_log_level(logging.WARNING)  # its INFO lists every operation it leaves alone
    kept = modules_nodes(model, settings.keep_fp32_modules)
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    log.info("quantizing the UNet with NNCF (%s preset) from %d calibration samples, %d operations kept fp32",
             settings.preset, len(samples), len(kept))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(samples),
        preset=presets[settings.preset],
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        fast_bias_correction=settings.fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
    )
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    return quantized, {**settings.to_json(), "operations_kept_fp32": len(kept), "fake_quantize_nodes": fake_quantize}


def verify(ov, ir: Path, onnx_file: Path, descriptor: NetworkDescriptor, profile: ShapeProfile,
           precision: str) -> list[dict[str, Any]]:
    """Run the IR (OpenVINO, fp32) against its ONNX source (ONNX Runtime); fail an fp32 IR that disagrees."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(str(ir), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = []
    for batch, height, width in tested_shapes(descriptor, profile):
        feeds = descriptor.sample_inputs(batch, height, width, seed=1)
        want = session.run(None, feeds)
        got = compiled(feeds)
        errors, scales = [], []
        for expected, port in zip(want, compiled.outputs):
            have = got[port]
            if have.shape != expected.shape:
                raise ExportError(f"{descriptor.name}: IR output {port.get_any_name()} has shape {have.shape}, "
                                  f"expected {expected.shape}")
            errors.append(float(np.abs(have.astype(np.float32) - expected).max()))
            scales.append(float(np.abs(expected).max()))
        results.append({"batch": batch, "height": height, "width": width,
                        "max_abs_error": max(errors), "output_max_abs": max(scales)})
        if precision == "fp32" and max(errors) > FP32_TOLERANCE * max(1.0, max(scales)):
            raise ExportError(f"{descriptor.name}: the OpenVINO IR and its ONNX source disagree at batch {batch}, "
                              f"{width}x{height}: max abs error {max(errors):.2e} (outputs up to {max(scales):.2f})")
        if not all(np.isfinite(got[p]).all() for p in compiled.outputs):
            raise ExportError(f"{descriptor.name} ({precision}) produced non-finite outputs at batch {batch}, "
                              f"{width}x{height}")
    return results


def _versions(*packages: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
