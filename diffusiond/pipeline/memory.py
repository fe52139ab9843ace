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
from typing import Any

import torch

from diffusiond.errors import OutOfMemory
from diffusiond.pipeline.observers import BatchObserver, NullBatchObserver

log = logging.getLogger(__name__)

Span = tuple[int, int]  # rows [start, end) of one owner
Outputs = torch.Tensor | tuple[torch.Tensor, ...]
Rows = Any  # a tensor, or anything else that slices by rows (e.g. CrossAttentionKV)


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
        fn: Callable[..., Outputs],
        inputs: Sequence[Rows],
        spans: Sequence[Span],
        key: Hashable,
        observer: BatchObserver | None = None,
    ) -> list[Outputs | None]:
        """``fn(*inputs)`` split by ``spans``: one output per owner, None for an owner that did not fit.

        ``inputs`` are row-stacked (anything sliceable by rows); ``fn`` returns a
        tensor or a tuple of tensors, each with one row per input row.
        """
        observer = observer or NullBatchObserver()
        n = inputs[0].shape[0]
        limit = self._limits.get(key)
        if limit is None or limit >= n:
            try:
                out = fn(*inputs)
                return [_rows(out, a, b) for a, b in spans]
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
        fn: Callable[..., Outputs],
        inputs: Sequence[Rows],
        spans: Sequence[Span],
        key: Hashable,
        limit: int,
        observer: BatchObserver,
    ) -> list[Outputs | None]:
        n = inputs[0].shape[0]
        owner = [index for index, (a, b) in enumerate(spans) for _ in range(a, b)]
        pieces: list[tuple[int, Outputs]] = []  # (first row, output rows)
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
            pieces.append((start, out))
            start += size
        outputs: list[Outputs | None] = []
        for index, (a, b) in enumerate(spans):
            parts = [(first, out) for first, out in pieces if first < b and first + _count(out) > a]
            covered = sum(min(b, first + _count(out)) - max(a, first) for first, out in parts)
            if index in failed or covered != b - a:
                outputs.append(None)
                continue
            rows = [_rows(out, max(a, first) - first, min(b, first + _count(out)) - first) for first, out in parts]
            outputs.append(_cat(rows))
        return outputs


def _count(out: Outputs) -> int:
    return (out[0] if isinstance(out, tuple) else out).shape[0]


def _rows(out: Outputs, a: int, b: int) -> Outputs:
    return tuple(t[a:b] for t in out) if isinstance(out, tuple) else out[a:b]


def _cat(parts: list[Outputs]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(group) for group in zip(*parts))  # type: ignore[arg-type]
    return torch.cat(parts)  # type: ignore[arg-type]
