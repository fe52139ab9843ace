"""Judging generated images: a deterministic pixel scorer, ``diffusiond eval`` and CLIP score."""
