"""The LoRA adapters a server offers (``serve --lora-dir DIR``): found by name, checked per model, cached.

``AdapterLibrary`` watches one directory. A name it does not know makes it
list the directory again, so an adapter copied in while the server runs is
found by the first request that names it (and by ``ListModels``, which
always lists afresh); a file replaced on disk is read again (its size and
modification time are part of every cache key). Headers are read on
lookup, tensors on first use: the converted tensors of adapters in use are
kept in one LRU cache bounded in bytes (``--lora-cache-mb``), shared by every
model; an adapter evicted from it is simply read again when next used.

``ModelAdapters`` is one model's view: it checks that an adapter fits that
model's UNet (an adapter for another base model is an error naming the file)
and hands the pipeline the tensors on the backend's device.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusiond.errors import AdapterFileError, NotFound, shown
from diffusiond.models.builtin import BUILTIN_ADAPTERS_DIR
from diffusiond.models.lora import AdapterFile, LoadedAdapter, inspect_file, load_adapter, match_modules, scan_directory

log = logging.getLogger(__name__)

DEFAULT_CACHE_MB = 256


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as ``ListModels`` shows it for a model; ``error`` says why that model cannot use it."""

    name: str
    file: str
    format: str = ""
    rank: int = 0
    base_model: str = ""
    layers: int = 0
    size_bytes: int = 0
    error: str = ""


def resolve_lora_dir(text: str) -> Path:
    """``--lora-dir``'s value as a directory: ``builtin`` is the adapters shipped for the built-in model."""
    return BUILTIN_ADAPTERS_DIR if text == "builtin" else Path(text)


class AdapterLibrary:
    """The adapter files in one directory, and the LRU cache of converted adapters."""

    def __init__(self, directory: Path, cache_bytes: int = DEFAULT_CACHE_MB * 2**20) -> None:
        if not directory.is_dir():
            raise NotFound(f"--lora-dir {directory} is not a directory")
        self.directory = directory
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._index: dict[str, Path] = {}
        self._headers: dict[Path, tuple[tuple[int, int], AdapterFile | AdapterFileError]] = {}
        self._loaded: OrderedDict[tuple[object, ...], LoadedAdapter] = OrderedDict()
        self._loaded_bytes = 0
        self.loads = 0  # adapters read from disk (cache misses), for tests and logs
        self.rescan()

    def rescan(self) -> dict[str, Path]:
        index = scan_directory(self.directory)
        with self._lock:
            added = sorted(set(index) - set(self._index))
            self._index = index
        if added:
            log.info("adapters found in %s: %s", self.directory, ", ".join(added))
        return index

    def names(self) -> list[str]:
        return sorted(self.rescan())

    def path_of(self, name: str) -> Path | None:
        with self._lock:
            return self._index.get(name)

    def file(self, name: str) -> AdapterFile:
        """The header of adapter ``name``: NotFound naming it, or AdapterFileError naming its file."""
        with self._lock:
            path = self._index.get(name)
        if path is None or not path.exists():
            path = self.rescan().get(name)
        if path is None:
            raise NotFound(f"adapter {shown(name)} is not in {self.directory} "
                           f"(adapters there: {', '.join(sorted(self._index)) or 'none'})")
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed since the directory was listed
            raise NotFound(f"adapter {shown(name)} was removed from {self.directory}") from None
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._headers.get(path)
        if cached is None or cached[0] != version:
            try:
                header: AdapterFile | AdapterFileError = inspect_file(path, name)
            except AdapterFileError as exc:
                header = exc
            cached = (version, header)
            with self._lock:
                self._headers[path] = cached
        if isinstance(cached[1], AdapterFileError):
            raise cached[1]
        return cached[1]

    def cached(self, key: tuple[object, ...], make: Callable[[], LoadedAdapter]) -> LoadedAdapter:
        """The converted adapter under ``key``, made (read from disk) on a miss and kept while it fits."""
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        adapter = make()
        with self._lock:
            self.loads += 1
            if adapter.size_bytes <= self.cache_bytes:
                self._loaded[key] = adapter
                self._loaded_bytes += adapter.size_bytes
                while self._loaded_bytes > self.cache_bytes:
                    _, evicted = self._loaded.popitem(last=False)
                    self._loaded_bytes -= evicted.size_bytes
                    log.info("adapter %s left the cache (%d bytes held)", evicted.name, self._loaded_bytes)
        log.info("adapter %s read from %s (%s format, rank %d, %d layers, %.1f kB)", adapter.name, adapter.file.path,
                 adapter.file.format, adapter.file.rank, len(adapter.layers), adapter.size_bytes / 1e3)
        return adapter

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._loaded_bytes

    def for_model(self, model: str, weight_shapes: Mapping[str, tuple[int, ...]], device: torch.device) -> ModelAdapters:
        return ModelAdapters(self, model, weight_shapes, device)


class ModelAdapters:
    """The library as one model sees it: adapters checked against its UNet, on its device (an AdapterSource)."""

    def __init__(self, library: AdapterLibrary, model: str, weight_shapes: Mapping[str, tuple[int, ...]],
                 device: torch.device) -> None:
        self.library = library
        self.model = model
        self._shapes = dict(weight_shapes)
        self._device = device
        self._fits: dict[tuple[Path, int, int], AdapterFileError | None] = {}

    def check(self, name: str) -> AdapterFile:
        """Adapter ``name``'s header, once it is known to fit this model (NotFound / AdapterFileError otherwise)."""
        header = self.library.file(name)
        key = (header.path, header.mtime_ns, header.size_bytes)
        if key not in self._fits:
            try:
                match_modules(header, self._shapes)
                self._fits[key] = None
            except AdapterFileError as exc:
                self._fits[key] = exc
        problem = self._fits[key]
        if problem is not None:
            raise problem
        return header

    def load(self, name: str) -> LoadedAdapter:
        header = self.check(name)
        key = (self.model, name, header.path, header.mtime_ns, header.size_bytes)
        return self.library.cached(key, lambda: load_adapter(header, self._shapes, self._device))

    def version(self, name: str) -> tuple[object, ...]:
        """What identifies the file behind ``name`` now (for result-cache keys)."""
        header = self.library.file(name)
        return (str(header.path), header.mtime_ns, header.size_bytes)

    def describe(self) -> list[AdapterInfo]:
        """Every adapter in the directory (listed afresh), with why this model cannot use it where it cannot."""
        infos = []
        for name in self.library.names():
            path = self.library.path_of(name)
            try:
                header = self.check(name)
            except (AdapterFileError, NotFound) as exc:
                infos.append(AdapterInfo(name=name, file=str(path or ""), error=str(exc)))
                continue
            infos.append(AdapterInfo(
                name=name, file=str(header.path), format=header.format, rank=header.rank,
                base_model=header.base_model, layers=len(header.targets), size_bytes=header.size_bytes,
            ))
        return infos
