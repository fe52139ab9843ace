"""A procedural data set: one shape in a named colour on a plain background, with its caption.

Every image is drawn on the fly from a seed, e.g. "a small red circle on a blue
background, top left". A scene is five attributes (shape colour, background
colour, shape, size, position); the combinations are split once, by a fixed
seed, into a training set, a validation set (to pick sampling defaults) and a
held-out test set whose captions the model never sees in training: scores on
the held-out prompts measure whether it learned the words, not the captions.

A style says how the picture is drawn: ``plain`` (the built-in model's
training data) or ``framed`` (the same scene inside a frame ``FRAME_WIDTH``
pixels wide along the image's edges, white, or black on a white background):
the style the project's example LoRA adapter teaches, which the base model
never saw. (Thinner styles, such as shapes drawn as outlines, did not survive
the first built-in model's autoencoder, whose latents were 8x8: it decoded
them filled, so no UNet adapter could draw them.)

Shapes are drawn at 4x resolution and box-filtered down, so edges are
anti-aliased the way a decoder would draw them. Positions are the centres of a
3x3 grid with a little jitter; the scorer's thresholds lie half-way between
grid centres, far from any jittered position.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# Well separated in RGB so a pixel-reading scorer can name them without doubt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Side of the shape's bounding box, in pixels of the 64x64 image.
SIZES: dict[str, int] = {"small": 14, "large": 24}
# (column, row) in the 3x3 grid; the phrase ends the caption.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
GRID_CENTRES = (18, 32, 46)  # pixel centre of grid column/row 0, 1, 2
POSITION_JITTER = 2  # pixels, each axis
SIZE_JITTER = 2  # pixels

# How a picture is drawn: "plain" (the built-in model's data) or "framed" (the LoRA example's style).
STYLES = ("plain", "framed")
FRAME_WIDTH = 5  # pixels of the 64x64 image
FRAME_COLOURS = {"white": "black"}  # background -> frame colour where it is not white

SPLIT_SEED = 20240601
TEST_SIZE = 300
VALIDATION_SIZE = 100


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` says it in words."""

    colour: str
    background: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else self.position
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {where}"

    def as_dict(self) -> dict[str, str]:
        return {
            "colour": self.colour, "background": self.background, "shape": self.shape,
            "size": self.size, "position": self.position,
        }


def caption_words() -> list[str]:
    """Every word a caption can use, for the tokenizer's vocabulary."""
    words = ["a", "on", "background", "in", "the", *SIZES, *COLOURS, *SHAPES]
    for phrase in POSITIONS:
        words += phrase.split()
    return list(dict.fromkeys(words))


@lru_cache(maxsize=1)
def all_scenes() -> tuple[Scene, ...]:
    """Every combination of attributes (the shape never has the background's colour)."""
    scenes = [
        Scene(colour, background, shape, size, position)
        for colour, background, shape, size, position in itertools.product(COLOURS, COLOURS, SHAPES, SIZES, POSITIONS)
        if colour != background
    ]
    return tuple(scenes)


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[Scene, ...]]:
    scenes = list(all_scenes())
    random.Random(SPLIT_SEED).shuffle(scenes)
    test = scenes[:TEST_SIZE]
    validation = scenes[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE]
    train = scenes[TEST_SIZE + VALIDATION_SIZE :]
    return {"train": tuple(train), "validation": tuple(validation), "test": tuple(test)}


def split(name: str) -> tuple[Scene, ...]:
    """``train``, ``validation`` or ``test`` (held out: never seen in training)."""
    try:
        return _splits()[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; choose train, validation or test") from None


def held_out_prompts(count: int | None = None) -> list[Scene]:
    """The first ``count`` held-out test scenes, in a fixed order."""
    scenes = list(split("test"))
    if count is not None:
        if not 1 <= count <= len(scenes):
            raise ValueError(f"count must be between 1 and {len(scenes)}, got {count}")
        scenes = scenes[:count]
    return scenes


@dataclass(frozen=True)
class Placement:
    """Where exactly a scene's shape is drawn (pixels of the 64x64 image)."""

    cx: float
    cy: float
    side: float


def place(scene: Scene, rng: random.Random) -> Placement:
    col, row = POSITIONS[scene.position]
    cx = GRID_CENTRES[col] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = GRID_CENTRES[row] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    side = SIZES[scene.size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return Placement(cx, cy, side)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1); a triangle points up with its base at the bottom."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, box: tuple[float, float, float, float], size: int = IMAGE_SIZE) -> np.ndarray:
    """How much of each pixel of a ``size``-square image ``shape`` filling ``box`` covers, in [0, 1]."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(big), shape, tuple(v * SUPERSAMPLE for v in box), 255)  # type: ignore[arg-type]
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def frame_colour(background: str) -> str:
    """The ``framed`` style's frame colour on ``background``: white, or black on white."""
    return FRAME_COLOURS.get(background, "white")


def render(scene: Scene, placement: Placement, style: str = "plain") -> np.ndarray:
    """The scene as a uint8 RGB array [64, 64, 3], drawn in ``style`` (see ``STYLES``)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    big = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, COLOURS[scene.background])
    h = placement.side / 2
    box = (placement.cx - h, placement.cy - h, placement.cx + h, placement.cy + h)
    draw = ImageDraw.Draw(big)
    draw_shape(draw, scene.shape, tuple(v * SUPERSAMPLE for v in box), COLOURS[scene.colour])  # type: ignore[arg-type]
    if style == "framed":
        draw.rectangle([0, 0, big.width - 1, big.height - 1], outline=COLOURS[frame_colour(scene.background)],
                       width=FRAME_WIDTH * SUPERSAMPLE)
    return np.asarray(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def sample(scenes: tuple[Scene, ...], seed: int, index: int, style: str = "plain") -> tuple[Scene, np.ndarray]:
    """Example ``index`` of a seeded stream: the same (seed, index) always gives the same image."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = scenes[rng.randrange(len(scenes))]
    return scene, render(scene, place(scene, rng), style)


def sample_coverage(scenes: tuple[Scene, ...], seed: int, index: int) -> tuple[Scene, np.ndarray]:
    """Example ``index`` of ``sample``'s stream, as its scene and how much of each pixel its shape covers
    (float [64, 64] in [0, 1]): where the shape is, for losses that weight it."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = scenes[rng.randrange(len(scenes))]
    p = place(scene, rng)
    h = p.side / 2
    return scene, coverage(scene.shape, (p.cx - h, p.cy - h, p.cx + h, p.cy + h))


def batch(scenes: tuple[Scene, ...], seed: int, start: int, count: int) -> tuple[list[str], np.ndarray]:
    """Captions and images [count, 64, 64, 3] uint8 for examples ``start .. start+count-1``."""
    captions: list[str] = []
    images: list[np.ndarray] = []
    for index in range(start, start + count):
        scene, image = sample(scenes, seed, index)
        captions.append(scene.caption)
        images.append(image)
    return captions, np.stack(images)


def write_images(out, scenes: tuple[Scene, ...], seed: int, count: int, style: str = "plain") -> list[Scene]:
    """Write examples 0..count-1 of a seeded stream as ``NNNN.png`` with the caption in ``NNNN.txt`` beside
    each (the layout ``diffusiond train-lora --images`` reads); returns their scenes."""
    from pathlib import Path

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        scene, image = sample(scenes, seed, index, style)
        Image.fromarray(image).save(directory / f"{index:04d}.png")
        (directory / f"{index:04d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        written.append(scene)
    return written
