"""The generated Python API modules are exactly what the .proto files produce."""

from __future__ import annotations

from diffusiond.api import codegen


def test_generated_code_is_up_to_date(tmp_path):
    written = codegen.generate(tmp_path)
    assert written, "protoc produced nothing"
    committed = codegen.REPO_ROOT / codegen.VIRTUAL_DIR
    for path in written:
        fresh = path.read_bytes()
        current = (committed / path.name).read_bytes()
        assert fresh == current, f"{path.name} is stale: run `make proto`"
