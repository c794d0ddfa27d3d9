"""Subject preprocessing and zoom-in crop / paste-back (shared by the pipeline and the trainer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from inference.subject import CLIP_MEAN, CLIP_STD, prepare_subject, subject_square
from inference.zoom import blend_alpha, crop_with_padding, mask_box, paste_back, zoom_box


def _subject(w=30, h=17):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    alpha = np.zeros((h, w), np.uint8)
    alpha[3:12, 5:25] = 255
    return rgb, Image.fromarray(alpha)


def test_rgba_and_image_mask_pair_are_the_same_subject():
    rgb, alpha = _subject()
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    a = prepare_subject(rgba, clip_size=32, refine_size=40)
    b = prepare_subject((rgb, alpha), clip_size=32, refine_size=40)
    assert torch.equal(a.clip_pixels, b.clip_pixels) and torch.equal(a.refine_pixels, b.refine_pixels)
    assert a.clip_pixels.shape == (3, 32, 32) and a.refine_pixels.shape == (3, 40, 40)
    assert a.refine_pixels.min() >= -1 and a.refine_pixels.max() <= 1


def test_square_is_box_crop_on_white_with_margin():
    rgb, alpha = _subject()
    square = subject_square((rgb, alpha))
    assert square.size == (round(20 * 1.02), round(20 * 1.02))  # box is 20 wide, 9 high
    arr = np.asarray(square)
    assert (arr[0] == 255).all() and (arr[-1] == 255).all()  # padding is white
    # The pixels inside the box are the subject's (alpha 255 there).
    top = (square.height - 9) // 2
    left = (square.width - 20) // 2
    np.testing.assert_array_equal(arr[top : top + 9, left : left + 20], np.asarray(rgb)[3:12, 5:25])


def test_normalisation_follows_the_processor():
    white = Image.new("RGB", (10, 10), "white")
    default = prepare_subject(white, 8, 8)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(default.clip_pixels[:, 0, 0], expected)
    custom = prepare_subject(white, 8, 8, image_processor=CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    torch.testing.assert_close(custom.clip_pixels, torch.ones(3, 8, 8))


def test_bad_subjects_are_clear_errors():
    rgb, alpha = _subject()
    with pytest.raises(ValueError, match="empty"):
        prepare_subject((rgb, Image.new("L", rgb.size, 0)), 8, 8)
    with pytest.raises(ValueError, match="mask is"):
        prepare_subject((rgb, alpha.resize((5, 5))), 8, 8)
    with pytest.raises(TypeError):
        prepare_subject("subject.png", 8, 8)


def test_zoom_box_is_square_expanded_and_slides_inside():
    box = zoom_box((40, 50, 60, 60), (200, 100), expansion=1.3)
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 == 26
    assert x0 <= 40 and y0 <= 50 and x1 >= 60 and y1 >= 60
    # Near an edge the square slides in rather than padding.
    x0, y0, x1, y1 = zoom_box((0, 0, 10, 10), (100, 100), expansion=2)
    assert (x0, y0) == (0, 0) and x1 - x0 == 20
    # Bigger than the image: stays centred and extends past it.
    x0, y0, x1, y1 = zoom_box((0, 0, 50, 10), (50, 20), expansion=1.3)
    assert y0 < 0 and y1 > 20 and x1 - x0 == 65
    with pytest.raises(ValueError):
        zoom_box((0, 0, 10, 10), (20, 20), expansion=0.5)


def test_crop_with_padding_fills_outside():
    image = Image.new("RGB", (10, 10), (10, 20, 30))
    crop = crop_with_padding(image, (-5, -5, 5, 5), fill=(0, 0, 0))
    arr = np.asarray(crop)
    assert crop.size == (10, 10)
    assert (arr[:5, :5] == 0).all() and (arr[5:, 5:] == (10, 20, 30)).all()


def test_paste_back_is_exact_outside_dilated_mask_and_full_inside():
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (53, 75, 3), dtype=np.uint8))
    mask_arr = np.zeros((53, 75), np.uint8)
    mask_arr[20:35, 30:50] = 255
    mask = Image.fromarray(mask_arr)
    box = zoom_box(mask_box(mask), original.size, 1.3)
    generated = Image.new("RGB", (64, 64), (255, 0, 0))
    out = np.asarray(paste_back(original, generated, box, mask, dilation=3, feather=2))
    alpha = blend_alpha(mask, 3, 2)
    outside = alpha == 0
    assert outside.any()
    np.testing.assert_array_equal(out[outside], np.asarray(original)[outside])
    assert (alpha[mask_arr == 255] == 1).all()
    np.testing.assert_array_equal(out[mask_arr == 255], np.full(((mask_arr == 255).sum(), 3), (255, 0, 0)))
    ramp = (alpha > 0) & (alpha < 1)
    assert ramp.any() and (mask_arr[ramp] == 0).all()  # the feathered edge lies outside the mask, inside the dilation
