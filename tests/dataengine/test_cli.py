"""dataengine/run.py and `python -m dataengine.inputs`: every bad input is one `error:` line and status 2.

The in-process cases call `main` (fast); a few run the real commands in a subprocess, where a
traceback would show. Images that fail to decode are not errors (test_engine.py checks their rows).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dataengine import inputs, run
from dataengine.inputs import write_sample_images


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one line, `error: ...`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_sample_images(folder)
    return folder


@pytest.fixture()
def base(repo_root: Path, tiny_zoo: Path) -> list[str]:
    return ["--config", str(repo_root / "pipelines.yaml"), "--pipeline", "sample", "--profile", "tiny", "--no-progress"]


def refused(argv: list[str], capsys, fragment: str) -> str:
    assert run.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert fragment in line, line
    return line


# --------------------------------------------------------------------------- config


def test_config_file_problems(tmp_path: Path, capsys, tiny_zoo):
    args = ["--pipeline", "sample", "--output", str(tmp_path / "out")]
    refused(["--config", str(tmp_path / "absent.yaml"), *args], capsys, "config file")
    refused(["--config", str(tmp_path), *args], capsys, "is a folder, not a YAML file")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81")
    refused(["--config", str(tmp_path / "bin.yaml"), *args], capsys, "is not a UTF-8 text (YAML) file")
    (tmp_path / "bad.yaml").write_text("pipelines: {sample: [unclosed\n")
    refused(["--config", str(tmp_path / "bad.yaml"), *args], capsys, "bad.yaml: not valid YAML: ")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    refused(["--config", str(tmp_path / "list.yaml"), *args], capsys, "the top level must be a mapping, got list")
    (tmp_path / "empty.yaml").write_text("")
    refused(["--config", str(tmp_path / "empty.yaml"), *args], capsys, "pipeline 'sample' is not defined; defined pipelines: none")
    assert not (tmp_path / "out").exists()


def test_unknown_pipeline_profile_and_bad_set(base, tmp_path: Path, capsys):
    out = ["--output", str(tmp_path / "out")]
    refused([*base, *out, "--pipeline", "nope"], capsys, "pipeline 'nope' is not defined; defined pipelines: default, sample")
    refused([*base, *out, "--profile", "huge"], capsys, "profile 'huge' is not defined; defined profiles: full, tiny")
    refused([*base, *out, "--set", "ground.box_threshold"], capsys, "expected KEY=VALUE")
    refused([*base, *out, "--set", "=0.3"], capsys, "expected KEY=VALUE")
    refused([*base, *out, "--set", "ground..box_threshold=0.3"], capsys, "expected KEY=VALUE")
    refused([*base, *out, "--set", "ground.box_threshold.x=1"], capsys, "is a value (0.0), not a section")
    refused([*base, *out, "--set", "inputs.2.images_per_shard=3"], capsys, "'pipelines.sample.inputs' is a list of 1 item")
    # Several problems at once: still one line, each named.
    line = refused([*base, *out, "--set", "ground.box_threshold=2", "--set", "ground.nms=1"], capsys, "box_threshold")
    assert "ground.nms: unknown key" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [(["--pipeline", ""], "argument --pipeline: must not be empty"),
     (["--pipeline", "sample", "--input", ""], "argument --input: must not be empty"),
     (["--pipeline", "sample", "--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
     ([], "the following arguments are required: --pipeline")],
)  # fmt: skip
def test_argparse_errors_end_in_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        run.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"dataengine/run.py: error: {fragment}"), err


# --------------------------------------------------------------------------- inputs


def test_input_problems(base, tmp_path: Path, capsys):
    out = ["--output", str(tmp_path / "out")]
    refused([*base, *out, "--input", str(tmp_path / "missing")], capsys, "input folder")
    photo = tmp_path / "one.png"
    write_sample_images(tmp_path / "src")
    photo.write_bytes((tmp_path / "src" / "coffee.png").read_bytes())
    refused([*base, *out, "--input", str(photo)], capsys, "is not a folder (kind: images expects a folder of images)")
    (tmp_path / "empty").mkdir()
    refused([*base, *out, "--input", str(tmp_path / "empty")], capsys, "holds no image")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no image here")
    refused([*base, *out, "--input", str(tmp_path / "texts")], capsys, "holds no image")
    refused([*base, *out, "--input", str(tmp_path / "list.parquet")], capsys, "table input")
    (tmp_path / "not.parquet").write_text("not a parquet file")
    refused([*base, *out, "--input", str(tmp_path / "not.parquet")], capsys, "is not a readable table: ")
    (tmp_path / "ragged.csv").write_text("image,caption\na.png,x,extra\n")
    refused([*base, *out, "--input", str(tmp_path / "ragged.csv")], capsys, "is not a readable table: CSV parse error")
    (tmp_path / "not.tar").write_bytes(b"\x00garbage" * 100)
    refused([*base, *out, "--input", str(tmp_path / "not.tar")], capsys, "is not a readable tar")
    refused([*base, *out, "--input", str(tmp_path / "shards-{0..3}.tar")], capsys, "webdataset input")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- output


def test_output_problems_leave_the_users_files_alone(base, images: Path, tmp_path: Path, capsys):
    args = [*base, "--input", str(images)]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    refused([*args, "--output", str(a_file)], capsys, "is a file, not a folder")
    refused([*args, "--output", str(a_file / "mined")], capsys, "a part of the path is a file, not a folder")
    refused([*args, "--output", str(images)], capsys, "is inside the input folder")
    refused([*args, "--output", str(images / "mined")], capsys, "is inside the input folder")
    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "holiday.jpg").write_bytes(b"precious")
    (users / ".draft.tmp").write_bytes(b"also precious")
    refused([*args, "--output", str(users)], capsys, "holds files a mining run does not write ('.draft.tmp' and 1 more)")
    assert a_file.read_text() == "mine"
    assert (users / "holiday.jpg").read_bytes() == b"precious" and (users / ".draft.tmp").read_bytes() == b"also precious"
    assert sorted(p.name for p in images.iterdir()) == sorted(inputs.SAMPLE_IMAGES)


def test_wrong_model_is_refused_before_any_worker_starts(base, images: Path, tmp_path: Path, tiny_zoo: Path, capsys):
    out = tmp_path / "out"
    refused(
        [*base, "--input", str(images), "--output", str(out), "--set", f"profiles.tiny.grounding={tiny_zoo / 'sam'}"],
        capsys, "grounding: ",
    )  # fmt: skip
    assert not out.exists()


def test_resume_with_a_corrupt_stats_file(base, images: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000_stats.json").write_text("{not json")
    refused([*base, "--input", str(images), "--output", str(out), "--backend", "local"], capsys, "not a readable stats file")


# --------------------------------------------------------------------------- the real commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_line_fast(repo_root: Path, tiny_zoo: Path, images: Path, tmp_path: Path):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    cmd = [sys.executable, "-m", "dataengine.run", "--config", "pipelines.yaml", "--pipeline", "sample",
           "--profile", "tiny", "--input", str(images), "--output", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert f"RAY_ADDRESS='{env['RAY_ADDRESS']}': no Ray cluster answers" in line
    assert not (tmp_path / "out").exists()

    env["RAY_ADDRESS"] = "http://127.0.0.1:8265"
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a URL" in one_error_line(proc.stderr)


def test_make_mine_with_an_unknown_pipeline(repo_root: Path, tiny_zoo: Path):
    proc = subprocess.run(
        ["make", "--no-print-directory", "mine", "PIPELINE=nope"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: pipelines.yaml: pipeline 'nope' is not defined; defined pipelines: default, sample" in proc.stderr


def test_sample_images_command(tmp_path: Path, capsys):
    assert inputs.main(["sample-images", str(tmp_path / "photos")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(inputs.SAMPLE_IMAGES)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    assert inputs.main(["sample-images", str(a_file)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert inputs.main(["sample-images", str(a_file / "sub")]) == 2
    assert "a part of the path is a file" in one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep"
    with pytest.raises(SystemExit) as info:
        inputs.main([])
    assert info.value.code == 2
    assert "error: the following arguments are required: COMMAND" in capsys.readouterr().err

