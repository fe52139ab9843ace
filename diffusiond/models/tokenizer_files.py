"""Write a CLIP-format BPE tokenizer (vocab.json + merges.txt) without a hub.

The built-in model needs a tokenizer that loads with ``CLIPTokenizer`` exactly
as Stable Diffusion's does. This builds one from the byte-level alphabet plus
whole-word merges for a given word list, so every listed word becomes a single
token and anything else still tokenizes (byte by byte) instead of mapping to <unk>.
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


def apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges): bytes, bytes at word end, merges that make every word one token, BOS/EOS.

    Merges apply in rank order, so a pair learnt for one word (``r e`` from
    "red") can split a later word ("green" -> ``g re e n``) unless the later
    word's own merges start from the pieces the earlier merges leave. Each word
    is therefore first encoded with the merges so far, and only the merges that
    join *those* pieces are appended; appending never changes how earlier words
    encode, because their own, lower-ranked merges always apply first.
    """
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + END_OF_WORD for a in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        word = word.strip().lower()
        if not word or not word.isascii() or not word.isalpha():
            continue
        pieces = apply_merges(list(word[:-1]) + [word[-1] + END_OF_WORD], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            ranks[pair] = len(merges)
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
