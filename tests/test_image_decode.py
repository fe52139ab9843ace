"""Input images cannot hurt the server: every check happens before decoding, and bad bytes are the client's error."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_inputs import bomb_png, encode, picture
from PIL import Image

from diffusiond.client import ClientError
from diffusiond.errors import InvalidArgument
from diffusiond.service.image_decode import ImageLimits, decode_image

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def bomb_30000() -> bytes:
    return bomb_png(30000)


def test_a_decompression_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(monkeypatch):
    data = bomb_png(10000)  # 100 megapixels in 12 KB: PIL itself would only warn, and decode it
    assert len(data) < 16 * 1024

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, "init_image", LIMITS)
    assert info.value.field == "init_image"
    assert str(info.value) == (
        "init_image: declares 10000x10000 = 100000000 pixels; the limit is 16777216 pixels (--max-input-pixels)"
    )


def test_images_over_the_byte_limit_are_refused_before_pil_sees_them(monkeypatch):
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("PIL opened an oversized input"))
    with pytest.raises(InvalidArgument, match=r"^mask_image: is 4096 bytes; the limit is 2048 bytes \(--max-input-image-mb\)"):
        decode_image(bytes(4096), "mask_image", ImageLimits(max_bytes=2048), mask=True)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_only_png_jpeg_and_webp_are_accepted(fmt):
    with pytest.raises(InvalidArgument, match="^init_image: is not a PNG, JPEG or WebP image$"):
        decode_image(encode(picture(32, 32), fmt), "init_image", LIMITS)


def test_a_truncated_jpeg_is_invalid_argument():
    data = encode(picture(64, 64), "JPEG", quality=90)
    with pytest.raises(InvalidArgument, match="^init_image: could not be decoded as JPEG: .*truncated"):
        decode_image(data[: len(data) // 2], "init_image", LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_allowed_format_decodes_to_rgb(fmt):
    pixels = picture(48, 40)
    image = decode_image(encode(pixels, fmt, **({"lossless": True} if fmt == "WEBP" else {})), "init_image", LIMITS)
    assert image.mode == "RGB" and image.size == (48, 40)
    error = np.abs(np.asarray(image, dtype=int) - pixels)
    assert error.mean() < 12 if fmt == "JPEG" else error.max() == 0  # JPEG is lossy


def test_transparency_is_composited_over_white_for_images_and_black_for_masks():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red on the left, fully transparent (black) on the right
    data = encode(rgba)
    image = np.asarray(decode_image(data, "init_image", LIMITS))
    assert (image[:, :4] == (255, 0, 0)).all() and (image[:, 4:] == 255).all()
    mask_rgba = rgba.copy()
    mask_rgba[:, :4] = (255, 255, 255, 255)  # an opaque white stroke on a transparent layer
    mask = np.asarray(decode_image(encode(mask_rgba), "mask_image", LIMITS, mask=True))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()


def test_palette_with_transparency_and_grey_with_alpha():
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0  # colour 0 (blue) is transparent
    image = np.asarray(decode_image(encode(palette), "init_image", LIMITS))
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[1, 1]) == (255, 255, 255)
    grey_alpha = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 255, np.uint8)]), "LA")
    assert np.asarray(decode_image(encode(grey_alpha), "init_image", LIMITS))[0, 0].tolist() == [100, 100, 100]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    mask = np.asarray(decode_image(data, "mask_image", LIMITS, mask=True))
    assert mask.tolist() == [[0, 100, 255, 128]]


def test_cmyk_jpeg_becomes_rgb():
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    image = decode_image(encode(red, "JPEG", quality=95), "init_image", LIMITS)
    assert image.mode == "RGB"
    r, g, b = np.asarray(image, dtype=int).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    stored = np.zeros((10, 20, 3), dtype=np.uint8)  # landscape as stored: red left half, blue right half
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    image = np.asarray(decode_image(encode(stored, "PNG", exif=exif), "init_image", LIMITS))
    assert image.shape == (20, 10, 3)  # portrait
    assert tuple(image[0, 5]) == (255, 0, 0) and tuple(image[-1, 5]) == (0, 0, 255)


def _png_and_jpeg() -> list[bytes]:
    return [encode(picture(16, 16)), encode(picture(16, 16), "JPEG")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_png_and_jpeg()),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.integers(0, 255)), max_size=8),
)
def test_mangled_files_are_either_an_image_or_invalid_argument(base, cut, flips):
    data = bytearray(base[: max(cut, 1)])
    for position, value in flips:
        data[position % len(data)] = value
    try:
        image = decode_image(bytes(data), "init_image", LIMITS)
    except InvalidArgument as exc:
        assert exc.field == "init_image"
    else:
        assert image.mode == "RGB" and image.width * image.height <= LIMITS.max_pixels


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_invalid_argument(data):
    with pytest.raises(InvalidArgument):
        decode_image(data, "mask_image", LIMITS, mask=True)


# -- over gRPC, on the shared server -----------------------------------------------------------


def _refused(client, **fields) -> ClientError:
    with pytest.raises(ClientError) as info:
        client.generate("a red circle", steps=2, seed=1, **fields)
    return info.value


def test_the_server_refuses_a_30000_pixel_square_png_by_its_header(client, bomb_30000):
    error = _refused(client, init_image=bomb_30000)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("init_image: declares more than") and "--max-input-pixels" in error.details


def test_the_server_refuses_a_truncated_jpeg_and_names_the_field(client):
    data = encode(picture(64, 64), "JPEG")
    error = _refused(client, init_image=encode(picture(64, 64)), mask=data[: len(data) // 2])
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("mask_image: could not be decoded as JPEG")


def test_the_default_receive_limit_admits_images_up_to_the_image_limit(client):
    """5 MiB is over gRPC's own 4 MiB default: it must reach the image checks, not die in the transport."""
    error = _refused(client, init_image=b"\0" * (5 * 1024 * 1024))
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, "init_image: is not a PNG, JPEG or WebP image")
    error = _refused(client, init_image=b"\0" * (9 * 1024 * 1024))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details == "init_image: is 9437184 bytes; the limit is 8388608 bytes (--max-input-image-mb)"


def test_after_the_refusals_the_server_still_serves(client, bomb_30000):
    _refused(client, init_image=bomb_30000)
    assert client.generate("a red circle", steps=2, seed=1).images[0].width == 64
