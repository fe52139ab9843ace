"""The client takes input images as bytes, files, PIL images or numpy arrays, and hi-res targets in three forms."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from image_inputs import encode, picture
from PIL import Image

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.client import build_request
from diffusiond.client.client import image_bytes, parse_hires


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_bytes_and_files_go_as_they_are(tmp_path):
    jpeg = encode(picture(), "JPEG")
    path = tmp_path / "in.jpg"
    path.write_bytes(jpeg)
    assert image_bytes(jpeg) == image_bytes(path) == image_bytes(str(path)) == jpeg


def test_pil_images_and_arrays_go_as_lossless_png():
    pixels = picture(40, 30)
    for image in (Image.fromarray(pixels), pixels, pixels.astype(np.float32) / 255):
        data = image_bytes(image)
        assert data.startswith(b"\x89PNG") and (decoded(data) == pixels).all()
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:10] = True
    assert (decoded(image_bytes(mask)) == mask.astype(np.uint8) * 255).all()
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert Image.open(io.BytesIO(image_bytes(cmyk))).mode == "RGB"


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((4, 4, 2), np.uint8), "an array must be HxW, HxWx3 or HxWx4, got shape (4, 4, 2)"),
    (np.zeros((4, 4), np.int32), "an array must be uint8, bool or float in [0, 1], got int32"),
])
def test_arrays_of_other_shapes_or_types_are_refused(image, message):
    with pytest.raises(ValueError, match=f"^{re.escape('mask: ' + message)}$"):
        image_bytes(image, "mask")
    with pytest.raises(TypeError, match="init_image: expected bytes, a path, a PIL image or a numpy array, got int"):
        image_bytes(3, "init_image")


@pytest.mark.parametrize(("value", "expected"), [
    (2, (2.0, 0, 0)), ("2x", (2.0, 0, 0)), ("1.5X", (1.5, 0, 0)), (" 3 ", (3.0, 0, 0)),
    ("1024x768", (0.0, 1024, 768)), ((96, 128), (0.0, 96, 128)),
])
def test_hires_targets(value, expected):
    assert parse_hires(value) == expected


def test_build_request_sets_every_image_field():
    msg = build_request("p", init_image=picture(), strength=0.0, mask=np.zeros((64, 64), np.uint8), mask_blur=3,
                        keep_unmasked=True, hires="2x", hires_steps=5, hires_strength=0.0, hires_upscaler="lanczos")
    assert msg.HasField("strength") and msg.strength == 0.0 and msg.mask_blur == 3 and msg.keep_unmasked
    assert decoded(msg.init_image).shape == (64, 64, 3) and decoded(msg.mask_image).shape == (64, 64)
    assert msg.HasField("hires") and msg.hires.HasField("strength")
    assert (msg.hires.scale, msg.hires.steps, msg.hires.upscaler) == (2.0, 5, pb.UPSCALER_LANCZOS)
    plain = build_request("p")
    assert not plain.init_image and not plain.HasField("strength") and not plain.HasField("hires")


def test_the_same_request_from_pil_numpy_and_bytes_gives_the_same_image(client):
    pixels = picture()
    results = [client.generate("a red circle", steps=3, seed=9, strength=0.5, init_image=image).images[0].data
               for image in (Image.fromarray(pixels), pixels, encode(pixels))]
    assert results[0] == results[1] == results[2]
