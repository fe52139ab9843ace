"""Running a network over many rows when they may not all fit in device memory.

Backends report a call that did not fit by raising ``diffusiond.errors.OutOfMemory``
(each converts its runtime's own error). ``RowRunner`` is the one place that
recovers: it retries the call with half the rows, then halves of those, and
keeps the row count that fit for later calls of the same shape. Rows are
independent (each output row depends only on its own inputs, up to kernel
rounding), so pieces give the same result. A row that does not fit even alone
fails only the request that owns it; every other request's rows go on. The
learnt row counts hold until ``forget`` (the batcher calls it when its running
set has drained).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import torch

from diffusiond.errors import OutOfMemory
from diffusiond.pipeline.observers import BatchObserver, NullBatchObserver

log = logging.getLogger(__name__)

Span = tuple[int, int]  # rows [start, end) of one owner


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back before retrying smaller."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class RowRunner:
    """Calls one network over row-stacked inputs, splitting the rows when memory runs out."""

    def __init__(self, network: str, device: torch.device) -> None:
        self.network = network
        self.device = device
        self._limits: dict[Hashable, int] = {}  # most rows that fit, per input shape

    def limit(self, key: Hashable) -> int | None:
        return self._limits.get(key)

    def forget(self) -> None:
        """Drop the learnt limits: once the work that ran out of memory has drained, try whole calls again."""
        self._limits.clear()

    def run(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: Sequence[torch.Tensor],
        spans: Sequence[Span],
        key: Hashable,
        observer: BatchObserver | None = None,
    ) -> list[torch.Tensor | None]:
        """``fn(*inputs)`` split by ``spans``: one output per owner, None for an owner that did not fit."""
        observer = observer or NullBatchObserver()
        n = inputs[0].shape[0]
        limit = self._limits.get(key)
        if limit is None or limit >= n:
            try:
                out = fn(*inputs)
                return [out[a:b] for a, b in spans]
            except OutOfMemory:
                release_cached_memory(self.device)
                limit = self._shrink(key, n, observer)
        return self._in_pieces(fn, inputs, spans, key, limit, observer)

    def _shrink(self, key: Hashable, rows: int, observer: BatchObserver) -> int:
        limit = max(1, (rows + 1) // 2)
        self._limits[key] = limit
        observer.on_out_of_memory(self.network, rows)
        log.warning("a %s call of %d rows ran out of memory; retrying %d rows at a time", self.network, rows, limit)
        return limit

    def _in_pieces(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: Sequence[torch.Tensor],
        spans: Sequence[Span],
        key: Hashable,
        limit: int,
        observer: BatchObserver,
    ) -> list[torch.Tensor | None]:
        n = inputs[0].shape[0]
        owner = [index for index, (a, b) in enumerate(spans) for _ in range(a, b)]
        rows: list[torch.Tensor | None] = [None] * n
        failed: set[int] = set()
        start = 0
        while start < n:
            if owner[start] in failed:
                start += 1
                continue
            size = min(limit, n - start)
            try:
                out = fn(*(x[start : start + size] for x in inputs))
            except OutOfMemory:
                release_cached_memory(self.device)
                if size == 1:
                    failed.add(owner[start])
                    start += 1
                else:
                    limit = self._shrink(key, size, observer)
                continue
            rows[start : start + size] = out.split(1)
            start += size
        outputs: list[torch.Tensor | None] = []
        for index, (a, b) in enumerate(spans):
            pieces = rows[a:b]
            fits = index not in failed and all(p is not None for p in pieces)
            outputs.append(torch.cat(pieces) if fits else None)  # type: ignore[arg-type]
        return outputs
