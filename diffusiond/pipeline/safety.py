"""An optional content filter on every image the pipeline hands out.

It runs diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision tower
compared with concept embeddings) with its CLIP image processor, loaded from a
local directory: either a checker directory holding ``config.json``, its
weights and ``preprocessor_config.json``, or a Stable Diffusion model directory
with ``safety_checker/`` and ``feature_extractor/``. A flagged image is replaced
by a black one; the caller is told which were.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffusiond.errors import FailedPrecondition

log = logging.getLogger(__name__)


def _locate(directory: Path) -> tuple[Path, Path]:
    """(checker directory, image processor directory) inside ``directory``."""
    if (directory / "safety_checker" / "config.json").is_file():
        return directory / "safety_checker", directory / "feature_extractor"
    return directory, directory


class SafetyChecker:
    def __init__(self, checker: torch.nn.Module, processor, device: torch.device) -> None:
        self._checker = checker
        self._processor = processor
        self._device = device

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker_dir, processor_dir = _locate(directory)
        if not (checker_dir / "config.json").is_file():
            raise FailedPrecondition(f"{directory} holds no safety checker (config.json or safety_checker/)")
        if not (processor_dir / "preprocessor_config.json").is_file():
            raise FailedPrecondition(
                f"{directory} holds no CLIP image processor (preprocessor_config.json or feature_extractor/)"
            )
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir, torch_dtype=torch.float32)
            processor = CLIPImageProcessor.from_pretrained(processor_dir)
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot load the safety checker from {directory}: {exc}") from None
        checker.to(device).eval().requires_grad_(False)
        log.info("safety checker loaded from %s", directory)
        return cls(checker, processor, device)

    @torch.inference_mode()
    def flags(self, images: np.ndarray) -> list[bool]:
        """Which of ``images`` ([B, H, W, 3], uint8 or float in [0, 1]) the checker flags."""
        pixels = images if images.dtype == np.uint8 else (images * 255).round().clip(0, 255).astype(np.uint8)
        clip_input = self._processor(list(pixels), return_tensors="pt").pixel_values.to(self._device)
        placeholders = [np.zeros((1, 1, 3)) for _ in range(len(pixels))]  # the checker blanks these, not ours
        _, flagged = self._checker(clip_input=clip_input, images=placeholders)
        return [bool(f) for f in flagged]

    def blank_flagged(self, images: np.ndarray) -> list[bool]:
        """Black out the flagged images in place; return the flags."""
        flagged = self.flags(images)
        for index, flag in enumerate(flagged):
            if flag:
                images[index] = 0
        return flagged
