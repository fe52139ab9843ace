"""Edge steepness and shape counting, the two measures the hi-res comparison reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusiond.eval.scorer import count_shapes
from diffusiond.eval.sharpness import edge_steepness

GREEN, RED = (30, 170, 60), (220, 30, 30)  # nearly the same brightness: only colour tells them apart


def scene(squares: list[tuple[int, int, int]], blur: float = 0.0, size: int = 128) -> np.ndarray:
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = GREEN
    for x, y, side in squares:
        pixels[y : y + side, x : x + side] = RED
    image = Image.fromarray(pixels)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image)


def test_steepness_falls_with_blur_and_ignores_how_many_shapes():
    one, three = [(40, 40, 30)], [(10, 10, 20), (70, 70, 20), (10, 80, 20)]
    values = [edge_steepness(scene(one, blur)) for blur in (0, 1, 2, 3)]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(0.5, abs=0.01)
    assert values[3] < 0.5 * values[0]
    assert edge_steepness(scene(three, 1)) == pytest.approx(edge_steepness(scene(one, 1)), rel=0.05)
    assert edge_steepness(np.full((32, 32, 3), 90, np.uint8)) == 0.0
    assert edge_steepness(scene(one).astype(np.float32) / 255) == pytest.approx(values[0])


def test_shapes_are_counted_at_any_size():
    assert count_shapes(scene([(40, 40, 30)])) == 1
    assert count_shapes(scene([(10, 10, 20), (70, 70, 20), (10, 80, 20)], blur=1)) == 3
    assert count_shapes(scene([(10, 10, 20), (70, 70, 3)])) == 1  # a speck is not a shape
    assert count_shapes(scene([(8, 8, 12)], size=64)) == 1
    assert count_shapes(np.full((64, 64, 3), 90, np.uint8)) == 0
