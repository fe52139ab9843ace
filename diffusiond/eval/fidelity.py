"""FID and Inception Score of generated images against a reference set, from a local feature network.

The arithmetic is torchmetrics' (``FrechetInceptionDistance``,
``InceptionScore``); the feature network is always loaded from a local file,
never downloaded:

- ``--inception-weights FILE``: a TorchScript Inception-v3 with the interface
  of the FID network NVIDIA publishes with StyleGAN2-ADA and StyleGAN3
  (``inception-2015-12-05.pt``, the TensorFlow FID weights):
  ``net(images, return_features=True)`` gives [N, 2048] pool features and
  ``net(images)`` [N, C] class probabilities, for uint8 images [N, 3, H, W] of
  any size (it resizes them itself). FID and IS with it are the standard ones
  (up to the number of images: FID is biased upward for small sets).
- otherwise a stand-in for FID only: the built-in model's VAE encoder,
  its latent means pooled to 4x4 (64 features). It knows what shapes-data-set
  images look like and nothing else, so its FID ranks models of the built-in
  model's kind against real renders and is **not comparable to published FID**.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusiond.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

STAND_IN_LABEL = "stand-in: the built-in model's VAE encoder (not comparable to published FID)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class FidelityScores:
    fid: float
    inception_score: float | None  # None where the feature network has no classifier (the stand-in)
    inception_score_std: float | None
    features: str  # which network gave the features
    generated: int
    reference: int


class _Features(torch.nn.Module):
    """uint8 images -> pool features, for torchmetrics' FID."""

    def __init__(self, net: torch.nn.Module, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True).float()


class _Logits(torch.nn.Module):
    """uint8 images -> log class probabilities, which torchmetrics' IS takes as logits (softmax undoes the log)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).float().clamp_min(1e-12).log()


class _VaeStandIn(torch.nn.Module):
    """The stand-in: a VAE encoder's latent means, average-pooled to 4x4, flattened."""

    def __init__(self, vae: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.vae = vae.eval()
        self.size = size
        self.num_features = 4 * 4 * int(vae.config.latent_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = self.vae.encode(x).latent_dist.mean
        return F.adaptive_avg_pool2d(mean, 4).flatten(1)


class FeatureNetwork:
    """What FID (and, with a classifier, IS) is computed with."""

    def __init__(self, features: torch.nn.Module, logits: torch.nn.Module | None, label: str) -> None:
        self.features = features
        self.logits = logits
        self.label = label

    @classmethod
    def from_file(cls, path: Path) -> FeatureNetwork:
        """A TorchScript Inception-v3 (see the module's docstring); FailedPrecondition when it is not one."""
        if not path.is_file():
            raise FailedPrecondition(f"--inception-weights {path} does not exist (it is never downloaded)")
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, and it is what these files are
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise FailedPrecondition(f"--inception-weights {path} is not a TorchScript module: {exc}") from None
        probe = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
        try:
            with torch.no_grad():
                features = net(probe, return_features=True)
                probabilities = net(probe)
        except (RuntimeError, TypeError) as exc:
            raise FailedPrecondition(
                f"--inception-weights {path} does not take (uint8 images, return_features=True): {exc}"
            ) from None
        if features.ndim != 2 or probabilities.ndim != 2:
            raise FailedPrecondition(
                f"--inception-weights {path}: expected [N, D] features and [N, C] probabilities, got "
                f"{tuple(features.shape)} and {tuple(probabilities.shape)}"
            )
        label = f"{path.name} ({features.shape[1]} features)"
        return cls(_Features(net, int(features.shape[1])), _Logits(net), label)

    @classmethod
    def stand_in(cls, model_dir: Path, size: int) -> FeatureNetwork:
        """The built-in model's VAE encoder (``model_dir`` holds it), for images of ``size`` pixels."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae")
        return cls(_VaeStandIn(vae, size), None, STAND_IN_LABEL)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images of one size -> uint8 [N, 3, H, W]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_reference(directory: Path, size: int) -> list[np.ndarray]:
    """Every image in ``directory`` (PNG, JPEG, WebP), as RGB at ``size`` x ``size``."""
    from PIL import Image

    if not directory.is_dir():
        raise InvalidArgument("reference", f"{directory} is not a directory")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise InvalidArgument("reference", f"{directory} holds {len(paths)} images; FID needs at least 2")
    images = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            images.append(np.asarray(rgb))
    return images


@torch.no_grad()
def score(
    generated: Sequence[np.ndarray], reference: Sequence[np.ndarray], network: FeatureNetwork, batch_size: int = 32,
    splits: int = 10,
) -> FidelityScores:
    """FID of ``generated`` against ``reference`` (and IS of ``generated`` when the network classifies)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError:
        raise FailedPrecondition("FID needs torchmetrics: pip install 'diffusiond[eval]'") from None

    if len(generated) < 2 or len(reference) < 2:
        raise InvalidArgument("num_prompts", f"FID needs at least 2 images on each side, got {len(generated)} "
                              f"generated and {len(reference)} reference")
    fid = FrechetInceptionDistance(feature=network.features, reset_real_features=True)
    for side, images in ((True, reference), (False, generated)):
        for first in range(0, len(images), batch_size):
            fid.update(to_tensor(images[first : first + batch_size]), real=side)
    value = float(fid.compute())
    mean = std = None
    if network.logits is not None:
        with warnings.catch_warnings():  # "will save all extracted features": a few hundred rows here
            warnings.simplefilter("ignore", UserWarning)
            inception = InceptionScore(feature=network.logits, splits=min(splits, len(generated)))
        for first in range(0, len(generated), batch_size):
            inception.update(to_tensor(generated[first : first + batch_size]))
        mean_t, std_t = inception.compute()
        mean, std = float(mean_t), float(std_t)
    return FidelityScores(value, mean, std, network.label, len(generated), len(reference))
