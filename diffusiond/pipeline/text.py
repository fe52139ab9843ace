"""Prompt tokenization and encoding, with an LRU cache of encodings.

Each distinct text is encoded on its own (batch of one), so a prompt's
embedding is bit-for-bit the same whether its request ran alone or in a batch,
and a cached embedding equals a fresh one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from diffusiond.backends.base import Backend


@dataclass(frozen=True)
class Encoding:
    hidden_states: torch.Tensor  # [1, T, D] float32 on the backend's device
    truncated_tokens: int  # tokens cut off at the encoder's length limit


class PromptEncoder:
    """Tokenizes like diffusers' StableDiffusionPipeline and runs the backend's text encoder."""

    def __init__(self, tokenizer, backend: Backend, max_length: int, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self._backend = backend
        self._max_length = max_length
        self._cache: OrderedDict[str, Encoding] = OrderedDict()
        self._cache_size = cache_size
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

    def encode(self, text: str) -> Encoding:
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return cached
            self.misses += 1
        ids, truncated = self.tokenize(text)
        encoding = Encoding(self._backend.text_encoder(ids), truncated)
        if self._cache_size > 0:
            with self._lock:
                self._cache[text] = encoding
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return encoding
