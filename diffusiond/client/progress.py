"""Progress for the command line: a tqdm bar in a terminal, plain lines anywhere else.

A bar redrawn with carriage returns is right on a terminal and garbage in a log
file, a pipe or CI output; there, one line at every tenth of the way (and at the
end) says the same without flooding the log.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
    def __init__(self, unit: str, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self._bar: Any = None
        self._tenths_shown = -1

    def update(self, done: int, total: int, eta_s: float | None = None) -> None:
        if self.tty:
            self._draw(done, total, eta_s)
            return
        tenths = done * 10 // max(total, 1)
        if tenths > self._tenths_shown:
            self._tenths_shown = tenths
            eta = "" if eta_s is None else f", ETA {eta_s:.1f}s"
            self.stream.write(f"{done}/{total} {self.unit} ({100 * done // max(total, 1)}%){eta}\n")
            self.stream.flush()

    def _draw(self, done: int, total: int, eta_s: float | None) -> None:
        from tqdm import tqdm

        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = tqdm(total=total, unit=self.unit, file=self.stream, dynamic_ncols=True, leave=True)
        self._bar.n = done
        if eta_s is not None:
            self._bar.set_postfix_str(f"ETA {eta_s:.1f}s", refresh=False)
        self._bar.refresh()

    def note(self, text: str) -> None:
        """A line of its own, above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
