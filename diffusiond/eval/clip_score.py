"""CLIP score of generated images against their prompts, with a CLIP model from a local directory.

CLIP score is 100 x max(cosine(image embedding, text embedding), 0), averaged
over images (the torchmetrics definition). It needs a directory holding a
``CLIPModel`` (``config.json`` + weights), its tokenizer and its image
processor config (``preprocessor_config.json``), e.g. a download of
``openai/clip-vit-base-patch32``; nothing is fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffusiond.errors import FailedPrecondition, NotFound


class ClipScorer:
    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(directory).expanduser()
        if not path.is_dir():
            raise NotFound(f"CLIP model directory {path} does not exist")
        for needed in ("config.json", "preprocessor_config.json"):
            if not (path / needed).is_file():
                raise FailedPrecondition(f"{path} is not a CLIP model directory: it has no {needed}")
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
            self.processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot load a CLIP model from {path}: {exc}") from None
        self.device = torch.device(device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """One score per (uint8 RGB image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        image_embeds = _embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _embedding(self.model.get_text_features(**tokens))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()


def _embedding(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in most transformers versions, an output object in some."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]
