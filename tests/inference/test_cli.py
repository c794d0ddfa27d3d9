"""`largen inpaint` end to end on the tiny zoo, and its one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.cli import EXIT_USAGE, main


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)).save(tmp_path / "scene.jpg")
    mask = np.zeros((45, 67), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "small_mask.png")
    subject = Image.fromarray(rng.integers(0, 256, (20, 14, 4), dtype=np.uint8))
    subject.save(tmp_path / "subject.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def _args(files, model, *extra):
    return ["inpaint", "--image", str(files / "scene.jpg"), "--out", str(files / "out.png"), "--model", str(model), "--steps", "2", *extra]


def test_cli_writes_a_png(files, tiny_zoo, capsys):
    model = tiny_zoo / "largen-pipeline"
    assert main(_args(files, model, "--mask", str(files / "mask.png"), "--prompt", "a red dog", "--subject", str(files / "subject.png"))) == 0
    out = Image.open(files / "out.png")
    assert out.format == "PNG" and out.size == (67, 45)
    assert "wrote" in capsys.readouterr().out
    (files / "out.png").unlink()
    assert main(_args(files, model, "--box", "5,5,30,40", "--prompt", "a cat", "--seed", "3")) == 0
    assert Image.open(files / "out.png").size == (67, 45)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "{d}/nope.png", "--prompt", "a dog"], "--mask '{d}/nope.png' does not exist"),
        (["--mask", "{d}/broken.png", "--prompt", "a dog"], "is not a readable image"),
        (["--mask", "{d}/small_mask.png", "--prompt", "a dog"], "--mask is 10x10 but --image is 67x45"),
        (["--mask", "{d}/mask.png"], "give --prompt, --subject, or both"),
        (["--box", "1,2,3", "--prompt", "a dog"], "four numbers"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/nope.png"], "--subject '{d}/nope.png' does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(files, tiny_zoo, capsys, extra, message):
    extra = [e.format(d=files) for e in extra]
    code = main(_args(files, tiny_zoo / "largen-pipeline", *extra))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and err.startswith("largen: error: ")
    assert message.format(d=files) in err
    assert not (files / "out.png").exists()


def test_cli_missing_image_and_model(files, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LARGEN_MODEL", raising=False)
    code = main(["inpaint", "--image", str(files / "scene.jpg"), "--box", "1,1,9,9", "--prompt", "x", "--out", str(files / "o.png")])
    assert code == EXIT_USAGE and "no model" in capsys.readouterr().err
    monkeypatch.setenv("LARGEN_MODEL", str(tmp_path / "nowhere"))
    code = main(["inpaint", "--image", str(files / "missing.jpg"), "--box", "1,1,9,9", "--prompt", "x", "--out", str(files / "o.png")])
    assert code == EXIT_USAGE and "--image" in capsys.readouterr().err
    code = main(["inpaint", "--image", str(files / "scene.jpg"), "--box", "1,1,9,9", "--prompt", "x", "--out", str(files / "o.png")])
    assert code == EXIT_USAGE and "not a LAR-Gen pipeline folder" in capsys.readouterr().err
