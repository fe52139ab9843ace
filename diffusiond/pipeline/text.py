"""Prompt tokenization and encoding, with an LRU cache of encodings.

Each distinct text is encoded on its own (batch of one), so a prompt's
embedding is bit-for-bit the same whether its request ran alone or in a batch,
and a cached embedding equals a fresh one. Where the backend caches
cross-attention (``CachesCrossAttention``), an encoding also carries every
cross-attention layer's keys and values of it: computed once per prompt, kept
in this cache, and reused at every denoising step of every request that uses
the prompt. The cache is bounded in entries and in bytes (keys and values of a
large model take megabytes per prompt).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from diffusiond.backends.base import Backend, CachesCrossAttention, CrossAttentionKV

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Encoding:
    hidden_states: torch.Tensor  # [1, T, D] float32 on the backend's device
    truncated_tokens: int  # tokens cut off at the encoder's length limit
    kv: CrossAttentionKV | None = None  # the cross-attention keys and values, where the backend caches them

    @property
    def context(self) -> torch.Tensor | CrossAttentionKV:
        """What the UNet takes for this prompt: its keys and values where precomputed, else the encoding."""
        return self.kv if self.kv is not None else self.hidden_states

    @property
    def size_bytes(self) -> int:
        tensors = [self.hidden_states]
        if self.kv is not None:
            tensors += [*self.kv.keys, *self.kv.values]
        return sum(t.numel() * t.element_size() for t in tensors)


class PromptEncoder:
    """Tokenizes like diffusers' StableDiffusionPipeline and runs the backend's text encoder."""

    def __init__(
        self, tokenizer, backend: Backend, max_length: int, cache_size: int = 256,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend = backend
        self._max_length = max_length
        self._cache: OrderedDict[Hashable, Encoding] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cache_entries(self) -> int:
        with self._lock:
            return len(self._cache)

    def tokenize(self, text: str) -> tuple[torch.Tensor, int]:
        ids = self._tokenizer(
            text, padding="max_length", max_length=self._max_length, truncation=True, return_tensors="pt"
        ).input_ids
        full_length = len(self._tokenizer(text, truncation=False).input_ids)
        return ids, max(0, full_length - self._max_length)

    def encode(self, text: str, adapters: Hashable = ()) -> Encoding:
        """``text``'s encoding. Where keys and values are precomputed they depend on the UNet's weights, so
        ``adapters`` (the adapter set active on the backend now) is part of the cache key."""
        key = (text, adapters if isinstance(self._backend, CachesCrossAttention) else ())
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        ids, truncated = self.tokenize(text)
        hidden = self._backend.text_encoder(ids)
        kv = self._backend.cross_attention_kv(hidden) if isinstance(self._backend, CachesCrossAttention) else None
        encoding = Encoding(hidden, truncated, kv)
        self._remember(key, encoding)
        return encoding

    def _remember(self, text: Hashable, encoding: Encoding) -> None:
        if self._cache_size <= 0 or encoding.size_bytes > self._cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(text, None)
            if old is not None:
                self._bytes -= old.size_bytes
            self._cache[text] = encoding
            self._bytes += encoding.size_bytes
            while len(self._cache) > self._cache_size or self._bytes > self._cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._bytes -= evicted.size_bytes
