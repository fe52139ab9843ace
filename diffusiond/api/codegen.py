"""Generate the Python protobuf/gRPC modules from ``protos/``.

The ``.proto`` files live under ``protos/diffusiond/v1`` (the path every other
language uses), but the Python modules live in ``diffusiond/api/v1``. protoc's
virtual path mapping (``-I<virtual>=<disk>``) places them there with correct
absolute imports, so no generated file is edited by hand.

Run ``python -m diffusiond.api.codegen`` (or ``make proto``). Needs grpcio-tools.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos" / "diffusiond" / "v1"
VIRTUAL_DIR = "diffusiond/api/v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Compile every ``.proto`` into ``out_root/diffusiond/api/v1``; return the files written."""
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
    return sorted((out_root / VIRTUAL_DIR).glob("*_pb2*.py*"))


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        sys.stdout.write(f"wrote {path.relative_to(REPO_ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
