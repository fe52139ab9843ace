"""How sharp an image of the shapes data set's kind is: how steep its edges are, whatever their number.

Edge steepness: the 99th percentile of the colour gradient (the Sobel
gradient of the RGB vector, in levels per pixel) divided by the image's
contrast (how far its most distinct colours lie from the background, the
median colour of its border, as the scorer reads it). A step from background
to shape drawn over w pixels scores about 1 / w, so a blurred image scores
less, and an image with more shapes does not score more for it. Colours, not
luminance: a red shape on a green background differs little in brightness.
Used to compare a hi-res-fix image with text to image at the same size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BORDER = 2  # pixels of the frame that give the background colour (as the scorer reads it)
EDGE_PERCENTILE = 99.0  # the steepest 1% of pixels: about the outline of one shape at 128 x 128
SOBEL_GAIN = 8.0  # |Sobel| of a unit step, so gradients read in levels per pixel


def edge_steepness(image: np.ndarray) -> float:
    """[H, W, 3] pixels, uint8 or float in [0, 1] -> steepness in 1/pixels (0: a flat image)."""
    source = np.asarray(image)
    pixels = source.astype(np.float64) * (255.0 if source.dtype.kind == "f" else 1.0)
    ring = np.ones(pixels.shape[:2], dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels[ring], axis=0)
    contrast = float(np.percentile(np.sqrt(((pixels - background) ** 2).sum(axis=2)), 99.5))
    if contrast <= 0:
        return 0.0
    squared = sum(ndimage.sobel(pixels[..., c], axis=a) ** 2 for c in range(3) for a in (0, 1))
    gradient = np.sqrt(squared) / SOBEL_GAIN
    return float(np.percentile(gradient, EDGE_PERCENTILE) / contrast)
