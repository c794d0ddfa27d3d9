"""Safe decoding: every kind of bad or unusual input image gives an upright RGB array or a clear reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dataengine.images import ImageDecodeError, decode_image

from .conftest import exif_rotated_jpeg, malformed_corpus, noise_image, png_bytes, stored_orientation

MAX_PIXELS = 40_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    malformed_corpus(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def decode(data: bytes, **kw) -> np.ndarray:
    return decode_image(data, max_pixels=kw.pop("max_pixels", MAX_PIXELS), min_side=kw.pop("min_side", 8), **kw)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero_byte.jpg", r"empty file \(0 bytes\)"),
        ("truncated.jpg", r"cannot decode JPEG data: image file is truncated"),
        ("not_an_image.png", r"not an image"),
        ("one_pixel.png", r"image is 1x1, smaller than limits.min_side=8"),
        ("huge.png", r"250x250 = 62500 pixels, over limits.max_pixels=40000 \(decompression-bomb guard\)"),
    ],
)
def test_unusable_inputs_name_the_reason(corpus, name, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode(corpus[name])


@pytest.mark.parametrize(
    "name", ["cmyk.jpg", "sixteen_bit.png", "palette_transparent.png", "grayscale.png", "animated.png", "good_a.png"]
)
def test_unusual_modes_become_rgb(corpus, name):
    arr = decode(corpus[name])
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags["C_CONTIGUOUS"]


def test_sixteen_bit_is_rescaled_not_clipped(corpus):
    src = Image.open(io.BytesIO(corpus["sixteen_bit.png"]))
    assert src.mode.startswith("I")
    arr = decode(corpus["sixteen_bit.png"])
    expected = (np.asarray(src, dtype=np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(arr[..., 0], expected)
    assert arr.max() < 255 or expected.max() == 255  # a plain convert("L") would clip nearly all to 255


def test_transparent_palette_is_composited_on_white(corpus):
    src = Image.open(io.BytesIO(corpus["palette_transparent.png"]))
    transparent = np.asarray(src) == 0
    arr = decode(corpus["palette_transparent.png"])
    assert transparent.any()
    assert (arr[transparent] == 255).all()


def test_exif_orientation_is_applied():
    upright = noise_image(48, 80, 8)
    data = exif_rotated_jpeg(upright)
    assert stored_orientation(data) == 6
    assert Image.open(io.BytesIO(data)).size == (80, 48)  # stored sideways
    arr = decode(data)
    assert arr.shape == (80, 48, 3)  # (H, W): upright portrait
    # JPEG noise aside, the same picture the right way up (not upside down, which has the same shape).
    diff = np.abs(arr.astype(int) - np.asarray(upright, dtype=int)).mean()
    flipped = np.abs(arr.astype(int) - np.asarray(upright.transpose(Image.Transpose.ROTATE_180), dtype=int)).mean()
    assert diff < flipped / 3


def test_animated_takes_first_frame():
    frames = [noise_image(64, 48, 20 + i) for i in range(3)]
    data = png_bytes(frames[0], save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(decode(data), np.asarray(frames[0]))


def test_longest_side_is_capped():
    arr = decode(png_bytes(noise_image(200, 100, 3)), max_side=64)
    assert arr.shape == (32, 64, 3)


def test_max_bytes_guard():
    with pytest.raises(ImageDecodeError, match="over limits.max_bytes=10"):
        decode(png_bytes(noise_image(16, 16, 1)), max_bytes=10)
