"""A TensorRT artifact: its manifest, the machine its engines are tied to, and whether they run here.

``diffusiond export tensorrt`` writes the manifest and the tensorrt backend
reads it, so it lives here, below both. An engine is compiled for one GPU
architecture (compute capability) and one TensorRT version; both are recorded
and compared with the machine before anything loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusiond.errors import FailedPrecondition, MissingDependency
from diffusiond.models.descriptors import REQUIRED_COMPONENTS, ShapeProfile

ENGINE_FILE = "model.plan"
MANIFEST_FILE = "manifest.json"
FORMAT = "diffusiond-tensorrt"
FORMAT_VERSION = 1


def import_tensorrt():
    """The ``tensorrt`` module, or MissingDependency saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependency(
            "tensorrt", "building and running TensorRT engines (on a machine with an NVIDIA GPU)", "tensorrt"
        ) from None
    except OSError as exc:  # the wheel is there but its CUDA libraries are not loadable
        raise FailedPrecondition(f"the tensorrt package is installed but cannot load its libraries: {exc}") from None
    return tensorrt


@dataclass(frozen=True)
class MachineInfo:
    """What an engine is tied to."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str

    @classmethod
    def current(cls, device: str = "cuda") -> MachineInfo:
        import torch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise FailedPrecondition("TensorRT engines need a CUDA GPU, and this PyTorch build sees none")
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), f"{major}.{minor}", trt.__version__)


@dataclass
class EngineManifest:
    precision: str
    machine: dict[str, str]
    source: dict[str, Any]  # the ONNX export: path, sha256, its precision and source model hash
    components: dict[str, dict[str, Any]]  # file, bytes, precision, flags, profile
    profile: dict[str, list[int]]
    options: dict[str, Any]
    options_key: str
    versions: dict[str, str]
    created: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> EngineManifest:
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise FailedPrecondition(
                f"{directory} has no {MANIFEST_FILE}: not a TensorRT artifact (build one with `diffusiond export tensorrt`)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            if int(data.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format_version {data['format_version']} is newer than this diffusiond reads")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise FailedPrecondition(f"{path} is not a TensorRT manifest this version reads: {exc}") from None

    @property
    def shape_profile(self) -> ShapeProfile:
        return ShapeProfile.from_json(self.profile)

    @property
    def model_sha256(self) -> str:
        return str(self.source.get("model_sha256", ""))


def compatibility_problems(manifest: EngineManifest, machine: MachineInfo) -> tuple[list[str], list[str]]:
    """(problems that make the engines unusable here, notes worth a warning)."""
    problems, notes = [], []
    built = manifest.machine
    if built.get("tensorrt_version") != machine.tensorrt_version:
        problems.append(
            f"built with TensorRT {built.get('tensorrt_version')}, this machine has {machine.tensorrt_version} "
            "(engines are tied to the TensorRT version that built them)"
        )
    if built.get("compute_capability") != machine.compute_capability:
        problems.append(
            f"built for compute capability {built.get('compute_capability')} ({built.get('gpu_name')}), "
            f"this GPU is {machine.compute_capability} ({machine.gpu_name})"
        )
    elif built.get("gpu_name") != machine.gpu_name:
        notes.append(
            f"built on a {built.get('gpu_name')}, running on a {machine.gpu_name} of the same architecture: "
            "it runs, but its kernels were timed on the other GPU; rebuild for best speed"
        )
    return problems, notes


def missing_engines(directory: Path, manifest: EngineManifest) -> list[str]:
    """What the artifact lacks: required engines absent from its manifest, listed engine files absent on disk."""
    problems = [f"no {c} engine in the manifest" for c in REQUIRED_COMPONENTS if c not in manifest.components]
    for name, entry in manifest.components.items():
        if not (directory / entry["file"]).is_file():
            problems.append(f"{name}: {entry['file']} is missing")
    return problems
