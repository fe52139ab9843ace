"""The canny edge map a ControlNet is conditioned on: one function, used in training and in serving.

A numpy/scipy implementation of OpenCV's ``cv2.Canny(image, low, high)`` (3x3
Sobel, L2 gradient magnitude, non-maximum suppression in four directions,
hysteresis with 8-connectivity), so no OpenCV is needed. As OpenCV does for
colour input, each pixel takes the gradient of the RGB channel where it is
strongest: edges between colours of equal brightness (red on blue) are found,
which a grey-scale conversion would lose. No blur is applied (OpenCV applies
none either); blur the input first for noisy photographs.

The result is what diffusers' ControlNet pipelines expect as a control image:
white edges (255) on black (0), three equal channels, the input's size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_LOW = 100.0
DEFAULT_HIGH = 200.0
MAX_THRESHOLD = 4 * 255 * 2**0.5  # the largest magnitude a 3x3 Sobel of uint8 pixels can reach


def canny(image: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> np.ndarray:
    """Edges of ``image`` (uint8 [H, W, 3] or [H, W]) as uint8 [H, W, 3]: 255 on an edge, 0 elsewhere.

    A pixel whose gradient magnitude reaches ``high`` is an edge; one between
    ``low`` and ``high`` is an edge when connected to such a pixel. Magnitudes
    are those of OpenCV with ``L2gradient=True`` (0 .. about 1442).
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 3] or [H, W], got shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    gx = np.stack([ndimage.sobel(pixels[:, :, c], axis=1, mode="nearest") for c in range(pixels.shape[2])], -1)
    gy = np.stack([ndimage.sobel(pixels[:, :, c], axis=0, mode="nearest") for c in range(pixels.shape[2])], -1)
    magnitude_c = np.hypot(gx, gy)
    strongest = np.argmax(magnitude_c, axis=2)[:, :, None]
    gx = np.take_along_axis(gx, strongest, 2)[:, :, 0]
    gy = np.take_along_axis(gy, strongest, 2)[:, :, 0]
    magnitude = np.take_along_axis(magnitude_c, strongest, 2)[:, :, 0]

    thin = _non_maximum_suppression(magnitude, gx, gy)
    strong = thin >= high
    weak = thin >= low
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = keep[labels]
    out = np.where(edges, 255, 0).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)


def _non_maximum_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its magnitude is a maximum along the gradient (quantised to 0/45/90/135 degrees)."""
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    horizontal = (angle < 22.5) | (angle >= 157.5)  # gradient along x: compare left and right
    diagonal = (angle >= 22.5) & (angle < 67.5)  # gradient along (+x, +y) in image rows
    vertical = (angle >= 67.5) & (angle < 112.5)
    anti = (angle >= 112.5) & (angle < 157.5)
    before = np.select(
        [horizontal, diagonal, vertical, anti],
        [shifted(0, -1), shifted(-1, -1), shifted(-1, 0), shifted(-1, 1)],
    )
    after = np.select(
        [horizontal, diagonal, vertical, anti],
        [shifted(0, 1), shifted(1, 1), shifted(1, 0), shifted(1, -1)],
    )
    # OpenCV's asymmetric rule: strictly greater than one neighbour, at least the other, so plateaus keep one pixel.
    keep = (magnitude > before) & (magnitude >= after)
    return np.where(keep, magnitude, 0.0)
