"""The wheel carries what users of other languages and of the web page need: the .proto files and the page."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_protos_and_the_page(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("diffusiond-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "diffusiond/api/protos/diffusiond/v1/diffusion.proto" in names
    for page in ("index.html", "app.js", "style.css"):
        assert f"diffusiond/server/gateway/static/{page}" in names
    shipped = zipfile.ZipFile(wheel).read("diffusiond/api/protos/diffusiond/v1/diffusion.proto")
    assert shipped == (REPO / "protos" / "diffusiond" / "v1" / "diffusion.proto").read_bytes()
