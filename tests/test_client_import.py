"""The client and its CLI work where only grpcio, protobuf and pillow are installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_HEAVY = """
import sys
for name in ("torch", "diffusers", "transformers", "numpy", "onnxruntime", "scipy"):
    sys.modules[name] = None  # any import of these now raises ImportError
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_client_imports_without_torch():
    proc = run_python(
        """
        import diffusiond.client as c
        import diffusiond.cli
        request = c.build_request("a fox", seed=1, output_format="webp")
        assert request.seed == 1
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_reports_unreachable_server_without_traceback():
    proc = run_python(
        """
        from diffusiond.cli import main
        raise SystemExit(main(["generate", "a fox", "--server", "127.0.0.1:1", "--timeout", "5"]))
        """
    )
    assert proc.returncode == 1
    assert "cannot reach a diffusiond server at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
