"""An optional LRU cache of finished, encoded results for fully seeded requests.

A request that carries its seed is a pure function of its model and fields,
so a repeat (a retried call, a UI re-rendering the same thumbnail) can be
answered without running the model. The key holds everything that decides the
output bytes: the model (name, source, backend, device, precision) and every
request field that reaches the images or their encoding. The cache is bounded
in bytes of encoded images, evicts the least recently used entries, and is off
unless ``--result-cache-mb`` is set.

A cached result is the one the first request got. When that request shared a
UNet batch, a fresh run alone could differ from it by kernel rounding (a few
8-bit levels, see the README); the cache makes repeats byte-identical.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace

from diffusiond.pipeline.request import GenerationRequest, Timings
from diffusiond.service.models import LoadedModel
from diffusiond.service.outputs import EncodedResult

ResultKey = tuple[object, ...]
ENTRY_OVERHEAD_BYTES = 512  # key, warnings and bookkeeping, roughly


def result_key(request: GenerationRequest, model: LoadedModel) -> ResultKey:
    backend = model.backend
    return (
        model.name, model.source, backend.name, str(backend.device), backend.dtype_name,
        request.prompt, request.negative_prompt, request.width, request.height, request.steps,
        request.guidance_scale, request.seed, request.num_images, request.scheduler,
        request.output_format.value, request.quality, request.cache_interval,
        request.cache_depth if request.caches_steps else 0,
        None if request.control is None else request.control.key(),
        request.init,  # strength, mask options and the digest of the image bytes (not the pixels)
        request.hires,
        request.adapters,
        tuple(model.adapters.version(name) for name, _ in request.adapters) if model.adapters is not None else (),
    )


@dataclass(frozen=True)
class CachedResult:
    result: EncodedResult
    size_bytes: int

    @classmethod
    def of(cls, result: EncodedResult) -> CachedResult:
        """The entry for ``result``, without its request's decoded input images: ``answer`` puts the asking
        request in their place, and the byte bound counts only the encoded images."""
        stripped = replace(result, request=replace(result.request, init=None))
        return cls(stripped, result.size_bytes + ENTRY_OVERHEAD_BYTES)

    def answer(self, request: GenerationRequest) -> EncodedResult:
        """The cached images as the answer to ``request``: its id, zero timings, marked as from the cache."""
        return replace(self.result, request=request, timings=Timings(), from_cache=True)


@dataclass
class CacheStats:
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    bytes: int = 0


class ResultCache:
    """Thread-safe LRU map from ``result_key`` to ``CachedResult``, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ResultKey, CachedResult] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits: defaultdict[str, int] = defaultdict(int)
        self._misses: defaultdict[str, int] = defaultdict(int)

    def get(self, key: ResultKey) -> CachedResult | None:
        model = str(key[0])
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses[model] += 1
                return None
            self._entries.move_to_end(key)
            self._hits[model] += 1
            return entry

    def put(self, key: ResultKey, entry: CachedResult) -> bool:
        """Store ``entry``, evicting the least recently used; False if it alone exceeds the bound."""
        if entry.size_bytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size_bytes
            self._entries[key] = entry
            self._bytes += entry.size_bytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size_bytes
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            entries: defaultdict[str, int] = defaultdict(int)
            for key in self._entries:
                entries[str(key[0])] += 1
            return CacheStats(dict(self._hits), dict(self._misses), dict(entries), self._bytes)
