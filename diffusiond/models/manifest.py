"""``manifest.json``: what an ONNX (or OpenVINO IR) export holds, where it came from, how it was made.

Export writes it last (a directory without one is incomplete or foreign);
export reads it to decide whether an artifact is up to date; a backend reads
it to refuse an artifact that is not what the operator asked for. It lives
here, below both, because both read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusiond.errors import FailedPrecondition
from diffusiond.models.descriptors import COMPONENTS, CONTROL_COMPONENTS, REQUIRED_COMPONENTS

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT = "diffusiond-onnx"
OPENVINO_FORMAT = "diffusiond-openvino"  # the same fields, over OpenVINO IR files (`diffusiond export openvino`)
FORMATS = (FORMAT, OPENVINO_FORMAT)
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ComponentEntry:
    precision: str
    files: list[str]  # relative to the artifact directory; the first is the model
    bytes: int
    io: dict[str, Any] = field(default_factory=dict)  # the descriptor: inputs, outputs, dynamic axes, profile
    tested: list[dict[str, Any]] = field(default_factory=list)  # shapes verified against PyTorch, with errors
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. ops kept in fp32, layers kept out of int8

    @property
    def model_file(self) -> str:
        return self.files[0]


@dataclass
class Manifest:
    precision: str
    opset: int
    source: dict[str, Any]  # path, sha256, bytes
    components: dict[str, ComponentEntry]
    options: dict[str, Any]  # every setting that decides the artifact's content
    options_key: str
    profile: dict[str, list[int]]
    versions: dict[str, str]
    exporter: str = "torch.onnx.export (TorchScript)"
    io_dtype: str = "float32"
    calibration: dict[str, Any] | None = None
    created: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    # LoRA adapters fused into the UNet's weights: [{"name", "scale", "file", "sha256"}]; empty: none.
    adapters: list[dict[str, Any]] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def source_sha256(self) -> str:
        return str(self.source.get("sha256", ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST_FILE + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, directory / MANIFEST_FILE)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") not in FORMATS:
            raise ValueError(f"format is {data.get('format')!r}, not one of {', '.join(map(repr, FORMATS))}")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {data['format_version']} is newer than this diffusiond reads")
        fields = dict(data)
        fields["components"] = {name: ComponentEntry(**entry) for name, entry in data["components"].items()}
        return cls(**fields)


def fused_adapter_set(adapters: list[dict[str, Any]]) -> tuple[tuple[str, float], ...]:
    """A manifest's fused adapters as the (name, scale) set requests name, sorted by name."""
    return tuple(sorted((str(a["name"]), float(a["scale"])) for a in adapters if float(a["scale"]) != 0.0))


def read_manifest(directory: Path) -> Manifest | None:
    """The directory's manifest; None when it has none; FailedPrecondition when it is unreadable."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"{path} is not a diffusiond manifest this version reads: {exc}") from None


def options_key(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def hash_directory(directory: Path) -> tuple[str, int]:
    """sha256 over every file's relative path and content (hidden files skipped); and the total bytes."""
    digest = hashlib.sha256()
    total = 0
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    for path in files:
        rel = path.relative_to(directory).as_posix()
        digest.update(rel.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
                total += len(chunk)
        digest.update(b"\0")
    return digest.hexdigest(), total


def missing_files(directory: Path, manifest: Manifest) -> list[str]:
    """Files the manifest lists that are absent, or whose size changed since export."""
    problems = []
    for name, entry in manifest.components.items():
        for rel in entry.files:
            if not (directory / rel).is_file():
                problems.append(f"{name}: {rel} is missing")
    return problems


def manifest_problems(directory: Path, manifest: Manifest) -> list[str]:
    """Why ``directory`` cannot be served as its manifest describes it (empty: nothing is wrong)."""
    absent = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
    if absent:
        return [
            f"lists no {', '.join(absent)} component in its manifest "
            f"(it lists {', '.join(manifest.components) or 'none'}); re-export it"
        ]
    unknown = [c for c in manifest.components if c not in (*COMPONENTS, *CONTROL_COMPONENTS)]
    if unknown:
        return [f"lists unknown components {', '.join(unknown)} in its manifest"]
    missing = missing_files(directory, manifest)
    if missing:
        return [f"is incomplete: {'; '.join(missing)}; re-export it"]
    return []


_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")


def infer_precision(unet_path: Path, unet_input_types: list[str] | None = None) -> str:
    """Precision of an export without a manifest (e.g. Optimum's): fp16 inputs, or quantize/dequantize nodes, tell.

    ``unet_input_types`` are the graph's input types as ONNX Runtime names them
    (``tensor(float16)``...), when a session already has them: they decide fp16
    without reading the file.
    """
    if "tensor(float16)" in (unet_input_types or []):
        return "fp16"
    try:
        import onnx
    except ImportError:
        return "fp32"
    graph = onnx.load(str(unet_path), load_external_data=False).graph
    if any(n.op_type in _QUANTIZED_OPS for n in graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in graph.input):
        return "fp16"
    return "fp32"
