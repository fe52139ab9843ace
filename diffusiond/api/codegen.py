"""Generate the Python protobuf/gRPC modules from ``protos/``.

The ``.proto`` files live under ``protos/diffusiond/v1`` (the path every other
language uses), but the Python modules live in ``diffusiond/api/v1``. protoc's
virtual path mapping (``-I<virtual>=<disk>``) places them there with correct
absolute imports, so no generated file is edited by hand. The ``.proto`` files
are also copied to ``diffusiond/api/protos/`` (same relative paths), so they
ship inside the wheel for clients in other languages (``diffusiond.api.PROTO_ROOT``).

Run ``python -m diffusiond.api.codegen`` (or ``make proto``). Needs grpcio-tools.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos" / "diffusiond" / "v1"
VIRTUAL_DIR = "diffusiond/api/v1"
PACKAGED_PROTOS = "diffusiond/api/protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Compile every ``.proto`` into ``out_root/diffusiond/api/v1`` and copy it under
    ``out_root/diffusiond/api/protos``; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_root.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    args = [
        "protoc",
        f"-I{VIRTUAL_DIR}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(f) for f in files],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    copies = []
    for source in files:
        target = out_root / PACKAGED_PROTOS / source.relative_to(PROTO_DIR.parents[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copies.append(target)
    return sorted((out_root / VIRTUAL_DIR).glob("*_pb2*.py*")) + copies


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        sys.stdout.write(f"wrote {path.relative_to(REPO_ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
