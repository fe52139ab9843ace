"""A deterministic scorer: does an image show the shapes data set's prompt?

It reads pixels only (no model), so its verdicts are the same on every machine
and for every backend under test:

- background: the median colour of the 2-pixel border, named by the nearest
  palette colour;
- the shape: the largest connected region that differs from the background by
  more than half the image's strongest contrast;
- shape colour: the region's median colour, named by the nearest palette colour;
- position: the region's bounding-box centre in a 3x3 grid whose lines lie
  half-way between the data set's grid centres;
- shape: the circle, square or triangle that, drawn into the region's bounding
  box, overlaps the region best (intersection over union);
- size: small or large by the bounding box's longer side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffusiond.training.dataset import COLOURS, GRID_CENTRES, POSITIONS, SHAPES, SIZES, Scene, coverage

ATTRIBUTES = ("colour", "background", "shape", "position", "size")
BORDER = 2
MIN_CONTRAST = 40.0  # RGB distance below which nothing stands out from the background
MIN_AREA = 12  # pixels; smaller regions are specks, not shapes

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_GRID_LINES = tuple((a + b) / 2 for a, b in zip(GRID_CENTRES, GRID_CENTRES[1:]))
_POSITION_NAMES = {cell: name for name, cell in POSITIONS.items()}
_SIZE_LINE = sum(SIZES.values()) / len(SIZES)


@dataclass(frozen=True)
class Reading:
    """What the scorer sees in an image; None where it sees no shape."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {name: getattr(self, name) == getattr(scene, name) for name in ATTRIBUTES}


def nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _grid_index(value: float) -> int:
    return sum(value >= line for line in _GRID_LINES)


def read_image(image: np.ndarray) -> Reading:
    """Read an RGB image (uint8 [H, W, 3], or float in [0, 1]) of the shapes data set's kind."""
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {pixels.shape}")
    pixels = pixels.astype(np.float32) * (255.0 if pixels.dtype.kind == "f" else 1.0)
    height, width, _ = pixels.shape
    ring = np.ones((height, width), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = np.median(pixels[ring], axis=0)
    background = nearest_colour(background_rgb)

    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    contrast = float(np.percentile(distance, 99.5))
    if contrast < MIN_CONTRAST:
        return Reading(background, None, None, None, None)
    labels, count = ndimage.label(distance > contrast / 2)
    areas = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    region = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(areas)))
    if region.sum() < MIN_AREA:
        return Reading(background, None, None, None, None)

    colour = nearest_colour(np.median(pixels[region], axis=0))
    rows, cols = np.nonzero(region)
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    scale_x, scale_y = 64 / width, 64 / height  # grid lines are in 64x64 pixels
    cell = (_grid_index((x0 + x1) / 2 * scale_x), _grid_index((y0 + y1) / 2 * scale_y))
    size = "large" if max((x1 - x0) * scale_x, (y1 - y0) * scale_y) >= _SIZE_LINE else "small"
    return Reading(background, colour, _best_shape(region, (x0, y0, x1, y1)), _POSITION_NAMES[cell], size)


def count_shapes(image: np.ndarray) -> int:
    """How many shapes an image shows (the data set's images show one): regions standing out from the
    background as ``read_image`` finds them, at least ``MIN_AREA`` pixels of a 64x64 image in size."""
    pixels = np.asarray(image).astype(np.float32) * (255.0 if np.asarray(image).dtype.kind == "f" else 1.0)
    height, width, _ = pixels.shape
    ring = np.ones((height, width), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    distance = np.sqrt(((pixels - np.median(pixels[ring], axis=0)) ** 2).sum(axis=2))
    contrast = float(np.percentile(distance, 99.5))
    if contrast < MIN_CONTRAST:
        return 0
    labels, count = ndimage.label(distance > contrast / 2)
    areas = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    return int((areas >= MIN_AREA * height * width / (64 * 64)).sum())


def _best_shape(region: np.ndarray, box: tuple[int, int, int, int]) -> str:
    best, best_iou = SHAPES[0], -1.0
    size = max(region.shape)
    for shape in SHAPES:
        template = coverage(shape, tuple(float(v) for v in box), size)[: region.shape[0], : region.shape[1]] >= 0.5
        iou = (template & region).sum() / max((template | region).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


@dataclass
class Scores:
    """Per-attribute accuracy over a set of images."""

    counts: dict[str, int]
    total: int

    @classmethod
    def tally(cls, verdicts: Iterable[dict[str, bool]]) -> Scores:
        counts = {name: 0 for name in (*ATTRIBUTES, "all")}
        total = 0
        for verdict in verdicts:
            total += 1
            for name in ATTRIBUTES:
                counts[name] += int(verdict[name])
            counts["all"] += int(all(verdict[name] for name in ("colour", "background", "shape", "position")))
        return cls(counts, total)

    def accuracy(self, name: str) -> float:
        return self.counts[name] / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: round(self.accuracy(name), 4) for name in self.counts}


def score_image(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    return read_image(image).matches(scene)
