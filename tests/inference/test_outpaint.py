"""Zoom-out (outpainting) on the tiny SD-1.5 and SDXL pipelines: the original comes back, the border is filled."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from inference.cli import main
from inference.outpaint import extend_canvas, margins, outpaint
from inference.sdxl import load_largen_pipeline


@pytest.fixture(scope="module", params=["largen-pipeline", "largen-xl-pipeline"])
def pipe(request, tiny_zoo):
    pipe = load_largen_pipeline(tiny_zoo / request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_margins_uniform_and_per_side():
    assert margins((100, 60), zoom_out=2.0) == (50, 30, 50, 30)
    assert margins((100, 60), extend=(0.5, 0, 0.25, 0)) == (50, 0, 25, 0)
    for kwargs, words in [({}, "exactly one of"), ({"zoom_out": 2, "extend": (0, 0, 0, 1)}, "exactly one of"),
                          ({"zoom_out": 1.0}, "zoom_out must be a number in (1, 4]"),
                          ({"zoom_out": float("nan")}, "zoom_out must be"),
                          ({"extend": (0, 0, 0)}, "4 numbers"), ({"extend": (-0.1, 0, 0, 0)}, ">= 0"),
                          ({"extend": (2, 0, 2, 0)}, "grows the width 5 times"),
                          ({"extend": (0.001, 0, 0, 0)}, "rounds to no pixel")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            margins((100, 60), **kwargs)


def test_canvas_places_the_image_and_masks_the_border(scene):
    image = scene[0]
    canvas = extend_canvas(image, (3, 2, 5, 7))
    assert canvas.image.size == (image.width + 8, image.height + 9) and canvas.box == (3, 2, 3 + image.width, 2 + image.height)
    mask = np.asarray(canvas.mask)
    assert (mask[2:-7, 3:-5] == 0).all() and mask.sum() == 255 * (mask.size - image.width * image.height)
    assert np.array_equal(np.asarray(canvas.image)[2:-7, 3:-5], np.asarray(image))


def test_outpaint_keeps_the_original_and_fills_the_border(pipe, scene):
    image, _, subjects = scene
    out = outpaint(pipe, image, zoom_out=1.5, prompt="a wide view", subject_image=subjects[0], num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
    result = np.asarray(out.images[0]).astype(int)
    x0, y0, x1, y1 = out.box
    # 1.5 x each axis (within the rounding of each side's margin), the image centred.
    assert out.images[0].size == (x0 + x1, y0 + y1) == (image.width + 2 * x0, image.height + 2 * y0)
    assert abs(out.images[0].width - 1.5 * image.width) <= 1 and abs(out.images[0].height - 1.5 * image.height) <= 1
    assert np.array_equal(result[y0:y1, x0:x1], np.asarray(image))  # every original pixel, unchanged
    # The border is the model's, not the replicated edge it started from: almost every pixel moved.
    start = cv2.copyMakeBorder(np.asarray(image), y0, result.shape[0] - y1, x0, result.shape[1] - x1,
                               cv2.BORDER_REPLICATE).astype(int)
    border = np.ones(result.shape[:2], bool)
    border[y0:y1, x0:x1] = False
    assert (np.abs(result - start).max(-1)[border] > 8).mean() > 0.9
    assert out.mode == "text+subject"


def test_outpaint_cli_per_side_and_its_errors(tiny_zoo, scene, tmp_path, capsys):
    src = tmp_path / "in.png"
    scene[0].save(src)
    model = str(tiny_zoo / "largen-pipeline")
    out = tmp_path / "out.png"
    base = ["outpaint", "--image", str(src), "--prompt", "a beach", "--steps", "1", "--model", model, "--out", str(out)]
    assert main([*base, "--extend", "0.5,0,0,0.2"]) == 0
    result = Image.open(out)
    assert result.size == (scene[0].width + round(0.5 * scene[0].width), scene[0].height + round(0.2 * scene[0].height))
    assert np.array_equal(np.asarray(result)[: scene[0].height, -scene[0].width:], np.asarray(scene[0]))
    capsys.readouterr()
    for extra, words in [(["--zoom-out", "5"], "--zoom-out: must be a number in (1, 4]"),
                         (["--zoom-out", "1"], "--zoom-out: zoom_out must be a number in (1, 4]"),
                         (["--extend", "1,2"], "--extend '1,2' must be four numbers >= 0"),
                         (["--extend", "0.001,0,0,0"], "--extend: the border rounds to no pixel")]:
        target = tmp_path / "bad.png"
        argv = [a if a != str(out) else str(target) for a in base]
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not target.exists()
