"""Writing an artifact directory so that readers never see it half-written.

Everything is written into a hidden staging directory beside the target and
then swapped in whole; a failure leaves the old artifact (if any) untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``out``, on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` with ``staging``; if the second rename fails, the old ``out`` is put back."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
