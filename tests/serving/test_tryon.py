"""Virtual try-on on the tiny zoo: the garment region from words (Grounding DINO + SAM), the garment as the subject."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.cli import main
from serving.masks import MaskResult, NothingFound
from serving.tryon import garment_mask, tryon
from tests.serving.conftest import noise_image

# Portrait, like a person photo (the tiny Grounding DINO cannot take a square image this small: its
# last feature level shrinks to one pixel).
PERSON = (48, 64)


def garment() -> Image.Image:
    g = noise_image(20, 24, seed=3).convert("RGBA")
    alpha = np.zeros((24, 20), np.uint8)
    alpha[3:21, 2:18] = 255
    g.putalpha(Image.fromarray(alpha))
    return g


def test_tryon_inpaints_the_found_region_with_the_garment_as_subject(tiny_pipeline, masker):
    person, cloth = noise_image(*PERSON, seed=1), garment()
    calls = []

    def recording(image, mask, **kwargs):
        calls.append((image, mask, kwargs))
        return tiny_pipeline(image, mask, **kwargs)

    result = tryon(recording, masker, person, cloth, "shirt", dilate=2, box_threshold=0, text_threshold=0,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert result.image.size == person.size and result.boxes
    (image, mask, kwargs), = calls
    expected, _ = garment_mask(masker, person, "shirt", 2, 0, 0)
    assert mask is result.mask and np.array_equal(np.asarray(mask), np.asarray(expected))
    assert kwargs["subject_image"] is cloth and kwargs["prompt"] is None  # subject-only: the paper's beta 1
    assert np.array_equal(np.asarray(image), np.asarray(person))
    assert not np.array_equal(np.asarray(result.image), np.asarray(person))


def test_garment_mask_grows_by_dilate():
    class OneBox:  # the masker's answer fixed, to check the growth itself (the tiny SAM's masks are whole images)
        def from_text(self, image, text, box_threshold, text_threshold):
            mask = np.zeros((64, 48), np.uint8)
            mask[20:30, 10:20] = 255
            return MaskResult(Image.fromarray(mask), 1.0, [[10, 20, 20, 30]])

    person = noise_image(*PERSON)
    assert garment_mask(OneBox(), person, dilate=0)[0].getbbox() == (10, 20, 20, 30)
    assert garment_mask(OneBox(), person, dilate=3)[0].getbbox() == (7, 17, 23, 33)


def test_words_that_find_nothing_raise(masker):
    with pytest.raises(NothingFound, match="no box for 'dress'"):
        garment_mask(masker, noise_image(*PERSON), "dress", box_threshold=1, text_threshold=1)


def test_tryon_cli_end_to_end_on_sdxl_and_its_errors(tiny_zoo, tmp_path, capsys):
    person, cloth = tmp_path / "person.png", tmp_path / "garment.png"
    noise_image(*PERSON, seed=1).save(person)
    garment().save(cloth)
    out = tmp_path / "dressed.png"
    base = ["tryon", "--image", str(person), "--garment", str(cloth), "--profile", "tiny", "--steps", "2",
            "--model", str(tiny_zoo / "largen-xl-pipeline")]
    assert main([*base, "--garment-words", "shirt", "--box-threshold", "0", "--text-threshold", "0",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == PERSON
    capsys.readouterr()
    transparent = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8)).save(transparent)
    bad = tmp_path / "bad.png"
    for argv, words in [
        ([*base, "--garment-words", " "], "--garment-words is empty"),
        ([*base[:4], str(transparent), *base[5:]], "--garment '" + str(transparent) + "' is fully transparent"),
        ([*base, "--profile", "nope"], "--profile 'nope': --profile 'nope' is not defined"),
        ([*base, "--box-threshold", "2"], "--box-threshold: must be a number in [0, 1]"),
    ]:
        assert main([*argv, "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not bad.exists()
