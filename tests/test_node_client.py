"""clients/node (TypeScript on @grpc/grpc-js) against a live server, and `buf lint` on the .proto files.

Both need `npm ci --prefix clients/node` (.ci/run does it). Without Node or those
packages the tests skip, unless DIFFUSIOND_REQUIRE_NODE=1 (as .ci/run sets it),
when they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import running_server

from diffusiond.client import DiffusionClient
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "clients" / "node"
REQUIRE_ENV = "DIFFUSIOND_REQUIRE_NODE"
TOKEN_NAME, TOKEN = "node", "node-client-token-0123456789"


def _node_tools() -> Path:
    """The clients/node/node_modules/.bin directory, or skip (fail when Node is required)."""
    bin_dir = NODE_DIR / "node_modules" / ".bin"
    missing = [what for what, ok in (("node", shutil.which("node")), ("npm", shutil.which("npm")),
                                     ("clients/node/node_modules (npm ci --prefix clients/node)",
                                      (bin_dir / "tsc").exists() and (bin_dir / "buf").exists())) if not ok]
    if missing:
        reason = f"needs {', '.join(missing)}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 says it must run")
        pytest.skip(reason)
    return bin_dir


def test_node_client_against_a_live_server(builtin_dir, tmp_path):
    _node_tools()
    settings = ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))],
                              auth_tokens_text=f"{TOKEN_NAME}:{TOKEN}")
    with running_server(settings) as thread:
        env = {**os.environ, "DIFFUSIOND_ADDRESS": thread.address, "DIFFUSIOND_TOKEN": TOKEN,
               "DIFFUSIOND_OUT": str(tmp_path)}
        proc = subprocess.run(["npm", "test"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "# fail 0" in output and "# pass 6" in output and "# skipped 0" in output, output
        with DiffusionClient(thread.address, timeout=120, token=TOKEN) as client:
            same = client.generate("a large red circle on a blue background, top left", steps=4, seed=21,
                                   num_images=2, scheduler="euler")
    assert (tmp_path / "generated.png").read_bytes() == same.images[0].data  # one API, any language


def test_buf_lint_passes_on_the_protos():
    bin_dir = _node_tools()
    proc = subprocess.run([str(bin_dir / "buf"), "lint"], cwd=REPO / "protos", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
