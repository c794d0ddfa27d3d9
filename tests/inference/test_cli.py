"""`largen inpaint` end to end on the tiny zoo, and its one-line errors for bad input."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import cli
from inference.cli import EXIT_USAGE, main
from inference.pipeline import BETA_MAX, DEFAULT_BETA, MODE_SUBJECT, MODE_TEXT_SUBJECT, LARGenPipeline

REPO = Path(__file__).resolve().parents[2]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)).save(tmp_path / "scene.jpg")
    mask = np.zeros((45, 67), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("L", (67, 45), 100).save(tmp_path / "dark_mask.png")  # below the 128 threshold: empty
    Image.new("L", (10, 10), 255).save(tmp_path / "small_mask.png")
    subject = Image.fromarray(rng.integers(0, 256, (20, 14, 4), dtype=np.uint8))
    subject.save(tmp_path / "subject.png")
    Image.new("RGBA", (14, 20), (200, 10, 10, 0)).save(tmp_path / "transparent.png")
    Image.new("L", (14, 20), 0).save(tmp_path / "empty_subject_mask.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    whole = (tmp_path / "mask.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    # A valid PNG header claiming 30000x30000 RGB: PIL refuses it from the header alone.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture()
def model(tiny_zoo):
    return tiny_zoo / "largen-pipeline"


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_zoo):
    """Pipeline folders that are wrong in one way each (copies of the tiny zoo's)."""
    model = tiny_zoo / "largen-pipeline"
    root = tmp_path_factory.mktemp("models")
    (root / "empty").mkdir()
    for name in ("bad_json", "no_unet", "bad_weights", "other_class"):
        shutil.copytree(model, root / name)
    (root / "bad_json" / "model_index.json").write_text('{"_class_name": "LARGen')
    shutil.rmtree(root / "no_unet" / "unet")
    weights = root / "bad_weights" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    index = (root / "other_class" / "model_index.json").read_text()
    (root / "other_class" / "model_index.json").write_text(index.replace("LARGenPipeline", "StableDiffusionInpaintPipeline"))
    return root


@pytest.fixture()
def no_model_work(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model: these inputs must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for an input that should have been refused first")

    monkeypatch.setattr(LARGenPipeline, "from_pretrained", refuse)


def _args(files, model, *extra, out="out.png"):
    return ["inpaint", "--image", str(files / "scene.jpg"), "--out", str(files / out), "--model", str(model), "--steps", "2", *extra]


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(("largen: error: ", "largen inpaint: error: ")), err
    assert "Traceback" not in err
    return err


def _nothing_written(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith(("out", ".out")) and p.is_file())
    assert left == [], left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_writes_an_image(files, model, capsys):
    assert main(_args(files, model, "--mask", str(files / "mask.png"), "--prompt", "a red dog", "--subject", str(files / "subject.png"))) == 0
    out = Image.open(files / "out.png")
    assert out.format == "PNG" and out.size == (67, 45)
    assert "wrote" in capsys.readouterr().out
    assert oct((files / "out.png").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not the temp file's 0600
    (files / "out.png").unlink()
    assert main(_args(files, model, "--box", "5,5,30,40", "--prompt", "a cat", "--seed", "3")) == 0
    assert Image.open(files / "out.png").size == (67, 45)
    # The format follows the suffix.
    assert main(_args(files, model, "--box", "5,5,30,40", "--prompt", "a cat", out="out.jpg")) == 0
    assert Image.open(files / "out.jpg").format == "JPEG"
    assert not [p.name for p in files.iterdir() if p.name.startswith(".")]  # no temp files left


def test_out_replaces_an_old_file_and_follows_a_symlink(files, model, capsys):
    (files / "results").mkdir()
    target = files / "results" / "latest.png"
    target.write_bytes(b"old")
    (files / "link.png").symlink_to(target)
    assert main(_args(files, model, "--box", "5,5,30,40", "--prompt", "a cat", out="link.png")) == 0
    assert (files / "link.png").is_symlink()  # the link is kept; the file it names is replaced
    assert Image.open(target).size == (67, 45)


def test_16_bit_grayscale_is_scaled_not_saturated():
    gray16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(cli._to_rgb(gray16))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "extra, names",
    [
        # --image
        (["--image", "{d}/missing.jpg", "--box", "1,1,9,9", "--prompt", "x"], "--image '{d}/missing.jpg' does not exist"),
        (["--image", "{d}/folder.png", "--box", "1,1,9,9", "--prompt", "x"], "--image '{d}/folder.png' is a folder"),
        (["--image", "{d}/broken.png", "--box", "1,1,9,9", "--prompt", "x"], "--image '{d}/broken.png' is not a readable image"),
        (["--image", "{d}/truncated.png", "--box", "1,1,9,9", "--prompt", "x"], "--image '{d}/truncated.png' is not a readable image (image file is truncated)"),
        (["--image", "{d}/bomb.png", "--box", "1,1,9,9", "--prompt", "x"], "--image '{d}/bomb.png' is too large"),
        # --mask
        (["--mask", "{d}/nope.png", "--prompt", "a dog"], "--mask '{d}/nope.png' does not exist"),
        (["--mask", "{d}/broken.png", "--prompt", "a dog"], "--mask '{d}/broken.png' is not a readable image"),
        (["--mask", "{d}/folder.png", "--prompt", "a dog"], "--mask '{d}/folder.png' is a folder"),
        (["--mask", "{d}/small_mask.png", "--prompt", "a dog"], "--mask is 10x10 but --image is 67x45"),
        (["--mask", "{d}/dark_mask.png", "--prompt", "a dog"], "--mask '{d}/dark_mask.png' is empty"),
        # --box
        (["--box", "1,2,3", "--prompt", "a dog"], "--box must be x0,y0,x1,y1 (four numbers)"),
        (["--box", "a,b,c,d", "--prompt", "a dog"], "--box must be x0,y0,x1,y1 (four numbers)"),
        (["--box", "nan,10,40,40", "--prompt", "a dog"], "--box 'nan,10,40,40' has a non-finite number"),
        (["--box", "10,10,inf,40", "--prompt", "a dog"], "--box '10,10,inf,40' has a non-finite number"),
        (["--box=-5,10,40,40", "--prompt", "a dog"], "--box '-5,10,40,40' has a negative coordinate"),
        (["--box", "40,10,20,40", "--prompt", "a dog"], "--box '40,10,20,40' is empty or inverted"),
        (["--box", "10,10,10,40", "--prompt", "a dog"], "--box '10,10,10,40' is empty or inverted"),
        (["--box", "10,10,68,40", "--prompt", "a dog"], "--box '10,10,68,40' goes outside the 67x45 image"),
        (["--box", "100,100,200,200", "--prompt", "a dog"], "--box '100,100,200,200' goes outside the 67x45 image"),
        (["--box", "10.1,10,10.3,40", "--prompt", "a dog"], "--box '10.1,10,10.3,40' covers no whole pixel"),
        (["--box", "-5,10,40,40", "--prompt", "a dog"], "argument --box: expected one argument (a value that starts with '-'"),
        # --prompt / --subject / --subject-mask
        (["--mask", "{d}/mask.png"], "give --prompt, --subject, or both"),
        (["--mask", "{d}/mask.png", "--prompt", "   "], "give --prompt, --subject, or both"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/nope.png"], "--subject '{d}/nope.png' does not exist"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/folder.png"], "--subject '{d}/folder.png' is a folder"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/truncated.png"], "--subject '{d}/truncated.png' is not a readable image"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/transparent.png"], "--subject '{d}/transparent.png' is fully transparent"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/subject.png", "--subject-mask", "{d}/small_mask.png"],
         "--subject-mask is 10x10 but --subject is 14x20"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/subject.png", "--subject-mask", "{d}/empty_subject_mask.png"],
         "--subject-mask '{d}/empty_subject_mask.png' is empty"),
        (["--mask", "{d}/mask.png", "--subject", "{d}/subject.png", "--subject-mask", "{d}/broken.png"],
         "--subject-mask '{d}/broken.png' is not a readable image"),
        (["--mask", "{d}/mask.png", "--prompt", "x", "--subject-mask", "{d}/mask.png"], "--subject-mask needs --subject"),
        # numbers
        (["--box", "1,1,9,9", "--prompt", "x", "--steps", "0"], "argument --steps: must be a whole number >= 1"),
        (["--box", "1,1,9,9", "--prompt", "x", "--steps", "-3"], "argument --steps: must be a whole number >= 1"),
        (["--box", "1,1,9,9", "--prompt", "x", "--steps", "2.5"], "argument --steps: must be a whole number >= 1"),
        (["--box", "1,1,9,9", "--prompt", "x", "--guidance", "nan"], "argument --guidance: must be a finite number >= 0"),
        (["--box", "1,1,9,9", "--prompt", "x", "--guidance", "-1"], "argument --guidance: must be a finite number >= 0"),
        (["--box", "1,1,9,9", "--prompt", "x", "--beta", "nan"], "argument --beta: must be a number in [0, 2]"),
        (["--box", "1,1,9,9", "--prompt", "x", "--beta", "2.5"], "argument --beta: must be a number in [0, 2]"),
        (["--box", "1,1,9,9", "--prompt", "x", "--beta=-0.1"], "argument --beta: must be a number in [0, 2]"),
        (["--box", "1,1,9,9", "--prompt", "x", "--seed=-1"], "argument --seed: must be a whole number in [0, "),
        (["--box", "1,1,9,9", "--prompt", "x", "--seed", str(2**64)], "argument --seed: must be a whole number in [0, "),
        # --device
        (["--box", "1,1,9,9", "--prompt", "x", "--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["--box", "1,1,9,9", "--prompt", "x", "--device", "meta"], "--device 'meta': the 'meta' device type is not supported"),
        (["--box", "1,1,9,9", "--prompt", "x", "--device", "cpu:3"], "--device 'cpu:3'"),
        # --out
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/out"], "--out '{d}/out' is a folder"),
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/result"], "--out '{d}/result' has no suffix"),
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/out.xyz"], "--out '{d}/out.xyz': PIL cannot write"),
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/out.xbm"], "--out '{d}/out.xbm': PIL cannot write"),
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/nope/out.png"], "--out '{d}/nope/out.png': folder '{d}/nope' does not exist"),
        (["--box", "1,1,9,9", "--prompt", "x", "--out", "{d}/scene.jpg/out.png"], "--out '{d}/scene.jpg/out.png': '{d}/scene.jpg' is not a folder"),
        # --model (the folder checks, before loading)
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{d}/nowhere"], "--model '{d}/nowhere' does not exist"),
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{d}/scene.jpg"], "--model '{d}/scene.jpg' is not a folder"),
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{m}/empty"], "not a LAR-Gen pipeline folder (no model_index.json)"),
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{m}/bad_json"], "model_index.json is not valid JSON"),
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{m}/no_unet"], "is incomplete: model_index.json lists 'unet'"),
        (["--box", "1,1,9,9", "--prompt", "x", "--model", "{m}/other_class"], "holds a StableDiffusionInpaintPipeline, not a LARGenPipeline"),
    ],
)
def test_bad_input_is_one_line_naming_it_before_any_model_work(files, model, broken_models, no_model_work, capsys, extra, names):
    extra = [e.format(d=files, m=broken_models) for e in extra]
    before = sorted(p.name for p in files.iterdir())
    err = _one_line_error(capsys, main(_args(files, model, *extra)))
    assert names.format(d=files, m=broken_models) in err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written, no temp file left


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_device_without_cuda(files, model, no_model_work, capsys, monkeypatch, device):
    # Whatever this machine has: the check asks torch, so torch is told there is no CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x", "--device", device)))
    assert f"--device '{device}': CUDA is not available" in err


def test_cuda_index_out_of_range(files, model, no_model_work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x", "--device", "cuda:2")))
    assert "--device 'cuda:2': this machine has 2 CUDA device(s)" in err


def test_mps_device_without_mps(files, model, no_model_work, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x", "--device", "mps")))
    assert "--device 'mps': MPS (Apple GPU) is not available" in err


def test_missing_model_and_env(files, capsys, monkeypatch, no_model_work):
    monkeypatch.delenv("LARGEN_MODEL", raising=False)
    argv = ["inpaint", "--image", str(files / "scene.jpg"), "--box", "1,1,9,9", "--prompt", "x", "--out", str(files / "o.png")]
    assert "no model: pass --model" in _one_line_error(capsys, main(argv))
    monkeypatch.setenv("LARGEN_MODEL", str(files / "nowhere"))
    assert f"--model '{files / 'nowhere'}' does not exist" in _one_line_error(capsys, main(argv))


def test_unloadable_weights_and_too_many_steps_are_one_line(files, broken_models, model, capsys):
    # These are only found by loading the model; still one line, still nothing written.
    err = _one_line_error(capsys, main(_args(files, broken_models / "bad_weights", "--box", "1,1,9,9", "--prompt", "x")))
    assert f"--model '{broken_models / 'bad_weights'}' cannot be loaded" in err
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x", "--steps", "1001")))
    assert "--steps must be <= 1000" in err
    _nothing_written(files)


def test_pipeline_value_errors_come_out_as_one_line(files, model, capsys, monkeypatch):
    def bad_call(self, *args, **kwargs):
        raise ValueError("subject mask is empty (no pixel with alpha/mask >= 128)\nsecond line")

    monkeypatch.setattr(LARGenPipeline, "__call__", bad_call)
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x")))
    assert "cannot inpaint: subject mask is empty" in err and "second line" not in err
    _nothing_written(files)


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: chmod for a normal user; sysfs for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()  # root ignores modes; sysfs refuses new files even to root
    sysfs = Path("/sys/kernel")
    if sysfs.is_dir():
        try:
            (sysfs / "largen-probe.png").touch()
        except OSError:
            return sysfs
        (sysfs / "largen-probe.png").unlink()
    pytest.fail("found no folder this user cannot write in (chmod and /sys/kernel both allowed it)")


def test_unwritable_out_folder_fails_first_without_a_traceback(files, model, tmp_path):
    folder = _unwritable_folder(tmp_path)
    out = folder / "out.png"
    # A real process: the check must come before torch/diffusers are even imported, let alone the model loaded.
    argv = ["inpaint", "--image", str(files / "scene.jpg"), "--box", "1,1,9,9", "--prompt", "x", "--model", str(model), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "inference.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stderr.splitlines() == [f"largen: error: --out '{out}': cannot write in folder '{folder}' (Permission denied)"]
    assert not out.exists()


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temp_file(files, model, capsys, monkeypatch):
    (files / "out.png").write_bytes(b"the user's previous result")
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO):  # the 1-pixel format probe of --out
            return real_save(self, fp, *args, **kwargs)
        fp.write(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    err = _one_line_error(capsys, main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x")))
    assert f"--out '{files / 'out.png'}' could not be written (No space left on device)" in err
    assert (files / "out.png").read_bytes() == b"the user's previous result"
    assert not [p.name for p in files.iterdir() if p.name.startswith(".")]


def test_interrupt_leaves_nothing_behind(files, model, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LARGenPipeline, "__call__", interrupted)
    code = main(_args(files, model, "--box", "1,1,9,9", "--prompt", "x"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERRUPTED and err == "largen: interrupted; nothing was written\n"
    _nothing_written(files)


def test_beta_defaults_follow_the_mode(files, model, capsys):
    """No --beta: 1.0 for a subject without a prompt, 0.3 with one (paper Table 1): same pixels as passing it."""
    subject = ["--mask", str(files / "mask.png"), "--subject", str(files / "subject.png")]
    runs = {
        "subject_default.png": subject,
        "subject_1.png": [*subject, "--beta", "1.0"],
        "subject_03.png": [*subject, "--beta", "0.3"],
        "both_default.png": [*subject, "--prompt", "a dog"],
        "both_03.png": [*subject, "--prompt", "a dog", "--beta", "0.3"],
    }
    pixels = {}
    for name, extra in runs.items():
        assert main(_args(files, model, *extra, out=name)) == 0, capsys.readouterr().err
        pixels[name] = np.asarray(Image.open(files / name))
    np.testing.assert_array_equal(pixels["subject_default.png"], pixels["subject_1.png"])
    np.testing.assert_array_equal(pixels["both_default.png"], pixels["both_03.png"])
    assert np.abs(pixels["subject_default.png"].astype(int) - pixels["subject_03.png"]).max() > 0  # beta matters here


def test_help_states_the_pipeline_beta_defaults(capsys):
    assert (
        DEFAULT_BETA[MODE_SUBJECT], DEFAULT_BETA[MODE_TEXT_SUBJECT], BETA_MAX,
    ) == (cli.BETA_SUBJECT_ONLY, cli.BETA_WITH_TEXT, cli.BETA_MAX)
    assert main(["inpaint", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{DEFAULT_BETA[MODE_SUBJECT]:.1f} for --subject without --prompt, {DEFAULT_BETA[MODE_TEXT_SUBJECT]:.1f} with a --prompt" in text


def test_version(capsys):
    expected = f"largen {metadata.version('lar-gen')}"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == expected
    proc = subprocess.run([sys.executable, "-m", "inference.cli", "--version"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout == expected + "\n" and proc.stderr == ""


def test_no_command_and_unknown_option_are_one_line(capsys):
    assert "required: COMMAND" in _one_line_error(capsys, main([]))
    assert "unrecognized arguments: --bogus" in _one_line_error(capsys, main(["inpaint", "--image", "a.png", "--box", "1,1,2,2", "--out", "o.png", "--bogus"]))


def test_healthy_run_prints_no_noise_off_a_terminal(files, model):
    """Piped stderr (a log, CI): no progress bars, nothing but the result line on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "inference.cli", *_args(files, model, "--mask", str(files / "mask.png"), "--prompt", "a dog",
                                                       "--subject", str(files / "subject.png"), "--device", "cpu")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {files / 'out.png'}\n"
    assert proc.stderr == ""  # not even transformers' torchvision notice (inference/logfilters.py)


def test_loading_bars_setting_is_restored(files, model, capsys):
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    assert main(_args(files, model, "--box", "5,5,30,40", "--prompt", "a cat")) == 0
    assert (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()) == before


def test_unknown_hub_id_is_one_line_without_library_chatter(files, capfd):
    # Offline (conftest sets HF_HUB_OFFLINE): diffusers logs "Couldn't connect to the Hub" before raising.
    code = main(_args(files, "nobody-here/no-such-model", "--box", "1,1,9,9", "--prompt", "x"))
    lines = capfd.readouterr().err.splitlines()
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0].startswith("largen: error: --model 'nobody-here/no-such-model' cannot be loaded: ")
    assert "stacktrace" not in lines[0]
    _nothing_written(files)


def test_library_log_lines_are_kept_on_success_and_dropped_on_failure():
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = {name: Collect() for name in ("diffusers", "transformers")}
    for name, handler in seen.items():  # stand-ins for the libraries' own stderr handlers
        logging.getLogger(name).addHandler(handler)
    try:
        with cli._model_loading(show_bars=False):
            logging.getLogger("diffusers.pipelines").warning("kept: a warning about a model that loaded")
            assert seen["diffusers"].messages == []  # held while loading
        with pytest.raises(OSError), cli._model_loading(show_bars=False):
            logging.getLogger("transformers.modeling_utils").warning("dropped: chatter before a failed load")
            raise OSError("cannot load")
    finally:
        for name, handler in seen.items():
            logging.getLogger(name).removeHandler(handler)
    assert seen["diffusers"].messages == ["kept: a warning about a model that loaded"]
    assert seen["transformers"].messages == []
