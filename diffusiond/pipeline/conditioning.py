"""Image inputs as the denoising loop needs them: pixel tensors, masks, the final paste-back, upscaling.

Checked, decoded pixels arrive here (``service.image_inputs`` fits them to the
request's size); these turn them into tensors the way diffusers'
``VaeImageProcessor`` does for ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline``, so the pipelines can be compared to the
last bit:

- an image is ``uint8 / 255`` in float32, then ``2x - 1``;
- a mask is binarized at one half (``>= 128`` repaints), the masked image is
  the image where the mask is 0 (zero, i.e. mid-grey, elsewhere), and the
  latent mask is the binary mask resized to the latent size by nearest
  neighbour.

The paste-back for ``keep_unmasked`` uses the mask as it came (after its blur),
not binarized, so a blurred mask gives a soft seam and pixels where it is 0
are the input's exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MASK_THRESHOLD = 128  # 8-bit mask values at or above this are repainted (diffusers: >= 0.5)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32) / 255.0
    return (2.0 * x - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def binary_mask(mask: np.ndarray) -> torch.Tensor:
    """[H, W] uint8 -> [1, 1, H, W] float32 of 0 (keep) and 1 (repaint)."""
    return torch.from_numpy((np.asarray(mask) >= MASK_THRESHOLD).astype(np.float32))[None, None]


def latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The binary pixel mask at the latent size (nearest neighbour, as diffusers resizes it)."""
    return torch.nn.functional.interpolate(mask, size=(latent_height, latent_width))


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image where it is kept, zero (mid-grey) where it is repainted."""
    return image * (mask < 0.5)


def paste_unmasked(images: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``images`` [k, H, W, 3] float in [0, 1] with ``original`` [H, W, 3] uint8 laid back over them
    wherever ``mask`` [H, W] uint8 is below 255, weighted by how far below (0: the original exactly)."""
    alpha = (np.asarray(mask, dtype=np.float32) / 255.0)[None, :, :, None]
    source = np.asarray(original, dtype=np.float32)[None] / 255.0
    return source * (1.0 - alpha) + images * alpha


def upscale_latents(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Bicubic interpolation in latent space (the "Latent (bicubic)" hi-res upscaler)."""
    return torch.nn.functional.interpolate(
        latents, size=(latent_height, latent_width), mode="bicubic", align_corners=False
    )


def resize_images(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """[k, H, W, 3] uint8 -> [k, height, width, 3] uint8 by Lanczos resampling (the pixel upscaler)."""
    resized = [np.asarray(Image.fromarray(i).resize((width, height), Image.Resampling.LANCZOS)) for i in images]
    return np.stack(resized)
