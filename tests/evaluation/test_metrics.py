"""Metrics with known answers. The tiny zoo's CLIP and DINO have random weights, so only answers that
hold for any weights are asserted: an image compared with itself scores 100 (cosine of identical
embeddings), anything else scores less; for CLIP-T, whose text tower carries no meaning here, the
right/wrong-prompt case is built so that the right prompt's embedding is the region's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from evaluation.metrics import (
    PSNR_CAP,
    background,
    background_scores,
    box_mask,
    crop_box,
    on_white,
    seam_margin,
)

# Largest |difference| seen between a batched and a one-by-one score (float32 matmuls), with room.
BATCH_TOL = 1e-3


def _subject() -> Image.Image:
    """An opaque RGBA subject (a red disc on a blue square), so its background-free form is exact."""
    img = Image.new("RGBA", (40, 40), (30, 60, 200, 255))
    ImageDraw.Draw(img).ellipse((6, 6, 34, 34), fill=(210, 40, 40, 255))
    return img


def _scene(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8))


def _with_region(scene: Image.Image, region: Image.Image, box) -> Image.Image:
    out = scene.copy()
    out.paste(region.convert("RGB"), (int(box[0]), int(box[1])))
    return out


BOX = (20.0, 10.0, 60.0, 50.0)


def test_identical_region_scores_100_and_a_flat_grey_one_less(scorer):
    subject, scene = _subject(), _scene()
    exact = _with_region(scene, subject, BOX)
    grey = _with_region(scene, Image.new("RGB", (40, 40), (128, 128, 128)), BOX)
    same, flat = scorer.score([exact, grey], [scene, scene], [BOX, BOX], [subject, subject], ["a ball"] * 2, 2)
    assert same.clip_i == pytest.approx(100.0, abs=1e-3)
    assert same.dino_i == pytest.approx(100.0, abs=1e-3)
    # Cosine is at most 1, reached only by a parallel embedding: grey is measurably lower
    # (seen with the tiny zoo: CLIP-I 74.9, DINO-I 93.9).
    assert flat.clip_i < same.clip_i - 0.5
    assert flat.dino_i < same.dino_i - 0.5


def test_clip_t_right_prompt_beats_wrong_prompt(scorer):
    """By construction: the right prompt's text embedding is the region's image embedding."""
    subject, scene = _subject(), _scene()
    output = _with_region(scene, subject, BOX)
    region = scorer.clip_images([crop_box(output, BOX)])[0]

    class Built(type(scorer)):
        def clip_texts(self, texts):
            other = torch.roll(region, 1)
            return torch.stack([region if t == "right" else other for t in texts])

    built = Built.__new__(Built)
    built.__dict__.update(scorer.__dict__)
    right, wrong = built.score([output, output], [scene, scene], [BOX, BOX], [subject, subject], ["right", "wrong"], 2)
    assert right.clip_t == pytest.approx(100.0, abs=1e-3)
    assert wrong.clip_t < right.clip_t - 0.5


def test_real_text_tower_is_deterministic_and_batch_independent(scorer):
    texts = ["a red ball nearby some books", "a cat", "a green ball"]
    batched = scorer.clip_texts(texts)
    single = torch.cat([scorer.clip_texts([t]) for t in texts])
    assert torch.allclose(batched, single, atol=BATCH_TOL)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # different prompts, different embeddings


def test_batching_does_not_change_a_score(scorer):
    subject, scenes = _subject(), [_scene(s) for s in range(3)]
    outputs = [_with_region(s, Image.new("RGB", (40, 40), (40 * k, 90, 200 - 30 * k)), BOX) for k, s in enumerate(scenes)]
    prompts = ["a red ball", "a ball nearby some books", "a green ball"]
    batch = scorer.score(outputs, scenes, [BOX] * 3, [subject] * 3, prompts, 2)
    for k in range(3):
        one = scorer.score([outputs[k]], [scenes[k]], [BOX], [subject], [prompts[k]], 2)[0]
        for name in ("clip_i", "clip_t", "dino_i", "psnr_bg", "changed_bg"):
            assert getattr(batch[k], name) == pytest.approx(getattr(one, name), abs=BATCH_TOL), name


def test_background_psnr_and_changed_pixels():
    scene = _scene()
    keep = background(box_mask(BOX, scene.size), margin=2)
    assert background_scores(scene, scene.copy(), keep) == (PSNR_CAP, 0.0)
    arr = np.asarray(scene).copy()
    arr[0, 0] = 255 - arr[0, 0]  # one background pixel
    arr[30, 40] = 0  # inside the box: not background
    arr[9, 40] = 0  # one pixel above the box, inside the 2-px margin: not background either
    psnr, changed = background_scores(scene, Image.fromarray(arr), keep)
    assert changed == pytest.approx(1 / keep.sum())
    assert 20 < psnr < PSNR_CAP
    # A margin of 0 counts the pixel just above the box.
    tight = background(box_mask(BOX, scene.size), margin=0)
    assert background_scores(scene, Image.fromarray(arr), tight)[1] == pytest.approx(2 / tight.sum())


def test_helpers():
    subject = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    subject.putpixel((1, 1), (10, 20, 30, 255))
    white = on_white(subject)
    assert white.getpixel((0, 0)) == (255, 255, 255) and white.getpixel((1, 1)) == (10, 20, 30)
    assert crop_box(_scene(), (10.5, 2.2, 20.1, 9.9)).size == (11, 8)
    assert seam_margin((80, 64)) == 2 and seam_margin((640, 480)) == 13
