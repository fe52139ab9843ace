"""The generated Python API modules are exactly what the .proto files produce."""

from __future__ import annotations

from diffusiond.api import codegen


def test_generated_code_is_up_to_date(tmp_path):
    written = codegen.generate(tmp_path)
    assert written, "protoc produced nothing"
    for path in written:
        relative = path.relative_to(tmp_path)
        current = codegen.REPO_ROOT / relative
        assert current.is_file(), f"{relative} is missing: run `make proto`"
        assert path.read_bytes() == current.read_bytes(), f"{relative} is stale: run `make proto`"
    assert any(path.suffix == ".proto" for path in written), "the .proto files are not copied for the wheel"


def test_the_proto_files_ship_inside_the_package():
    from diffusiond.api import PROTO_ROOT

    assert (PROTO_ROOT / "diffusiond" / "v1" / "diffusion.proto").is_file()
