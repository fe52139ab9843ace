"""The CLIP-format tokenizer the project writes: every listed word is one token."""

from __future__ import annotations

from transformers import CLIPTokenizer

from diffusiond.models.synthetic import WORDS
from diffusiond.models.tokenizer_files import apply_merges, build_vocab, write_clip_tokenizer
from diffusiond.training.dataset import caption_words


def test_every_word_is_one_token(tmp_path):
    words = list(dict.fromkeys([*WORDS, *caption_words()]))
    write_clip_tokenizer(tmp_path, words)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    split = {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1}
    assert split == {}
    assert tokenizer.tokenize("a small green circle on a blue background, top left") == [
        "a</w>", "small</w>", "green</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>",
        ",</w>", "top</w>", "left</w>",
    ]


def test_earlier_merges_do_not_split_later_words():
    # "re" (from "red") ranks before anything "green" adds; "green" must still become one token.
    vocab, merges = build_vocab(["red", "green", "reed"])
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in ("red", "green", "reed"):
        assert apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks) == [word + "</w>"]
        assert word + "</w>" in vocab


def test_unknown_words_fall_back_to_bytes(tmp_path):
    write_clip_tokenizer(tmp_path, ["red"])
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    assert tokenizer.unk_token_id not in tokenizer("zebra", add_special_tokens=False).input_ids
