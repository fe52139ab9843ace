"""Progress of a long export, told through logging (the CLI sends it to stderr)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("diffusiond.export")


class Progress:
    """Numbered stages with their durations, and counters inside long stages."""

    def __init__(self, total_stages: int, logger: logging.Logger = log) -> None:
        self.total = total_stages
        self.done = 0
        self.log = logger
        self.started = time.perf_counter()
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.done += 1
        self.log.info("[%d/%d] %s ...", self.done, self.total, name)
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.durations[name] = elapsed
        self.log.info("[%d/%d] %s: done in %.1fs", self.done, self.total, name, elapsed)

    def note(self, message: str, *args: object) -> None:
        self.log.info("      " + message, *args)

    def count(self, what: str, i: int, n: int, every: int = 1) -> None:
        """``i`` of ``n`` items of a stage done (logged every ``every`` items and at the end)."""
        if i == n or i % max(every, 1) == 0:
            self.log.info("      %s %d/%d (%.0fs so far)", what, i, n, time.perf_counter() - self.started)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
