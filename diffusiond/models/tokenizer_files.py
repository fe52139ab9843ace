"""Write a CLIP-format BPE tokenizer (vocab.json + merges.txt) without a hub.

The built-in model needs a tokenizer that loads with ``CLIPTokenizer`` exactly
as Stable Diffusion's does. This builds one from the byte-level alphabet plus
whole-word merges for a given word list, so common words become single tokens
and anything else still tokenizes (byte by byte) instead of mapping to <unk>.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges): bytes, bytes at word end, one merge chain per word, then BOS/EOS."""
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + END_OF_WORD for a in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        word = word.strip().lower()
        if not word or not word.isascii() or not word.isalpha():
            continue
        pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: Path, words: Iterable[str], max_length: int = 77) -> int:
    """Write a loadable CLIP tokenizer into ``directory``; return its vocabulary size."""
    vocab, merges = build_vocab(words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)
