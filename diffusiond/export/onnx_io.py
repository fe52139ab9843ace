"""Reading and writing ONNX files, with external data for models over protobuf's 2 GB limit.

A component is stored as ``model.onnx``; when its weights would push the file
past what protobuf can hold, they go to one ``model.onnx_data`` file beside it
(ONNX external data, the same layout Optimum writes), and loaders find them
through the relative path recorded in the graph.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
# Protobuf refuses messages of 2 GiB or more; stay well below it, the graph itself also takes room.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def import_onnx():
    from diffusiond.errors import MissingDependency

    try:
        import onnx
    except ImportError:
        raise MissingDependency("onnx", "ONNX export", "onnx") from None
    return onnx


def weight_bytes(model) -> int:
    """Bytes of the graph's initializers (without serialising: ByteSize fails past 2 GB)."""
    from onnx import numpy_helper

    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += numpy_helper.to_array(init).nbytes
    return total


def save_model(model, path: Path, external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` (and its external data beside it when large); return the files written.

    Intermediate shape annotations (``value_info``, left by conversion tools' shape inference) are
    dropped: runtimes infer them again, and in small models they are a large share of the file.
    """
    onnx = import_onnx()
    del model.graph.value_info[:]
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + "_data")
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    if external is None:
        external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
        return [path, data_path]
    onnx.save_model(model, str(path))
    return [path]


def load_model(path: Path, load_external_data: bool = True):
    onnx = import_onnx()
    return onnx.load(str(path), load_external_data=load_external_data)


def model_files(path: Path) -> list[Path]:
    """``path`` and the external data files its graph refers to."""
    onnx = import_onnx()
    from onnx.external_data_helper import uses_external_data

    files = [path]
    model = onnx.load(str(path), load_external_data=False)
    seen: set[str] = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                files.append(path.parent / location)
    return files


def files_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths if p.exists())


def nodes_in_modules(model, modules: tuple[str, ...]) -> list[str]:
    """Names of the nodes inside any module named in ``modules``.

    The TorchScript exporter names nodes by module path (``/model/down_blocks.0/resnets.0/conv_shortcut/Conv``),
    so a module is found by its attribute name wherever it sits.
    """
    wanted = set(modules)
    return [n.name for n in model.graph.node if wanted & set(n.name.split("/"))]
