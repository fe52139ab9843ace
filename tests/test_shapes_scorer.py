"""The shapes data set and its pixel scorer: ground truth scores 100%, wrong labels fail."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diffusiond.eval.scorer import ATTRIBUTES, Scores, read_image, score_image
from diffusiond.training import dataset
from diffusiond.training.dataset import COLOURS, POSITIONS, SHAPES, SIZES, Scene


def test_splits_are_disjoint_and_cover_every_scene():
    train, validation, test = (set(dataset.split(name)) for name in ("train", "validation", "test"))
    assert not (train & test) and not (train & validation) and not (validation & test)
    assert len(train | validation | test) == len(dataset.all_scenes()) == 8 * 7 * 3 * 2 * 9
    assert len(test) >= 200
    # Every single attribute value is learnable from the training split.
    for attribute, values in (("colour", COLOURS), ("background", COLOURS), ("shape", SHAPES),
                              ("size", SIZES), ("position", POSITIONS)):
        assert {getattr(s, attribute) for s in train} == set(values)


def test_samples_are_seeded():
    scenes = dataset.split("train")
    a_scene, a = dataset.sample(scenes, 3, 17)
    b_scene, b = dataset.sample(scenes, 3, 17)
    _, c = dataset.sample(scenes, 4, 17)
    assert a_scene == b_scene and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_caption():
    scene = Scene("red", "blue", "circle", "small", "top left")
    assert scene.caption == "a small red circle on a blue background, top left"
    assert Scene("red", "blue", "circle", "small", "center").caption.endswith(", in the center")


def test_ground_truth_images_score_perfectly():
    scenes = dataset.all_scenes()
    verdicts = [score_image(image, scene) for scene, image in (dataset.sample(scenes, 11, i) for i in range(400))]
    scores = Scores.tally(verdicts)
    assert scores.total == 400
    assert scores.as_dict() == {name: 1.0 for name in (*ATTRIBUTES, "all")}


def test_float_images_read_like_uint8():
    scene, image = dataset.sample(dataset.all_scenes(), 5, 0)
    assert read_image(image.astype(np.float32) / 255) == read_image(image)


@pytest.mark.parametrize("attribute", ["colour", "background", "shape", "position", "size"])
def test_mislabelled_images_fail_on_that_attribute(attribute):
    values = {"colour": COLOURS, "background": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    scenes = dataset.all_scenes()
    for i in range(40):
        scene, image = dataset.sample(scenes, 23, i)
        wrong = next(v for v in values if v != getattr(scene, attribute) and v not in (scene.colour, scene.background))
        verdict = score_image(image, dataclasses.replace(scene, **{attribute: wrong}))
        assert not verdict[attribute]
        assert all(verdict[name] for name in ATTRIBUTES if name != attribute)


def test_blank_and_noisy_images():
    blank = np.zeros((64, 64, 3), dtype=np.uint8) + np.array(COLOURS["green"], dtype=np.uint8)
    reading = read_image(blank)
    assert reading.background == "green" and reading.shape is None and reading.colour is None
    verdict = score_image(blank, Scene("red", "green", "circle", "small", "center"))
    assert verdict["background"] and not any(verdict[n] for n in ("colour", "shape", "position"))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    verdicts = [score_image(noise, s) for s in dataset.split("test")[:50]]
    assert Scores.tally(verdicts).accuracy("all") < 0.1


def test_scorer_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        read_image(np.zeros((64, 64), dtype=np.uint8))
