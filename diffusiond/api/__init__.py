"""Generated protobuf and gRPC code for ``protos/diffusiond/v1``, and the ``.proto`` files themselves.

Regenerate with ``make proto``; ``tests/test_api_codegen.py`` fails when these
files differ from what the ``.proto`` files produce. ``PROTO_ROOT`` is the
include directory for other languages' code generators
(``protoc -I $(python -c 'import diffusiond.api as a; print(a.PROTO_ROOT)') diffusiond/v1/diffusion.proto``).
"""

from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent / "protos"
