"""`python -m dataengine.release` (and `make shards`) on bad inputs and options: one line
`python -m dataengine.release: error: ...` naming the argument and the problem, exit 2, and
nothing the user owns touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dataengine.release import main
from tests.release.mined_data import mined_shard

PREFIX = "python -m dataengine.release: error: "


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (or of `root` itself when it is a file)."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """Run the command line in-process; (exit status, stderr). argparse errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    return code, capsys.readouterr().err


@pytest.fixture
def world(mined: tuple[Path, Path], release_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """Paths the cases name: a good mined folder, an existing release, a file, folders of each kind."""
    a, _ = mined
    uncommitted = tmp_path / "uncommitted"
    mined_shard(uncommitted, 0, [50], commit=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"\xff\xd8 not really")
    mine = tmp_path / "mine"
    shutil.copytree(a, mine)
    release = tmp_path / "release"
    shutil.copytree(release_dir, release)
    return {
        "mined": mine,
        "release": release,
        "uncommitted": uncommitted,
        "empty": tmp_path / "empty",
        "file": tmp_path / "notes.txt",
        "photos": tmp_path / "photos",
        "new": tmp_path / "out" / "v1",
        "tmp": tmp_path,
    }


# (case id, argv from the world's paths, text the one error line holds)
CASES: list[tuple[str, Callable[[dict[str, Path]], list[str]], str]] = [
    ("input missing", lambda w: ["--input", str(w["tmp"] / "nope"), "--output", str(w["new"])], "--input {tmp}/nope: does not exist"),
    ("input is a file", lambda w: ["--input", str(w["file"]), "--output", str(w["new"])], "--input {tmp}/notes.txt: is a file, not a mined folder"),
    ("input empty", lambda w: ["--input", str(w["empty"]), "--output", str(w["new"])], "--input {tmp}/empty: holds no committed shard"),
    ("input has no committed shard", lambda w: ["--input", str(w["uncommitted"]), "--output", str(w["new"])], "--input {tmp}/uncommitted: holds no committed shard"),
    ("one input of two missing", lambda w: ["--input", str(w["mined"]), str(w["tmp"] / "nope"), "--output", str(w["new"])], "--input {tmp}/nope: does not exist"),
    ("no input", lambda w: ["--output", str(w["new"])], "the following arguments are required: --input"),
    ("output is a file", lambda w: ["--input", str(w["mined"]), "--output", str(w["file"])], "--output {tmp}/notes.txt: exists and is not a folder"),
    ("output is a file, --overwrite", lambda w: ["--input", str(w["mined"]), "--output", str(w["file"]), "--overwrite"], "--output {tmp}/notes.txt: exists and is not a folder"),
    ("output is a release", lambda w: ["--input", str(w["mined"]), "--output", str(w["release"])], "--output {tmp}/release: exists; pass --overwrite to replace it"),
    ("output is not a release, --overwrite", lambda w: ["--input", str(w["mined"]), "--output", str(w["photos"]), "--overwrite"], "--output {tmp}/photos: exists and is not a release (no release.json); refusing to replace it"),
    ("output inside an input", lambda w: ["--input", str(w["mined"]), "--output", str(w["mined"] / "release")], "--output {tmp}/mine/release: is inside --input {tmp}/mine"),
    ("output is an input", lambda w: ["--input", str(w["mined"]), "--output", str(w["mined"]), "--overwrite"], "is inside --input {tmp}/mine"),
    ("input inside the output", lambda w: ["--input", str(w["release"] / "card"), "--output", str(w["release"]), "--overwrite"], "--input {tmp}/release/card: is inside --output {tmp}/release"),
    ("output parent is a file", lambda w: ["--input", str(w["mined"]), "--output", str(w["file"] / "v1")], "--output {tmp}/notes.txt/v1: {tmp}/notes.txt is a file, not a folder"),
    ("samples per shard 0", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--samples-per-shard", "0"], "argument --samples-per-shard: must be >= 1, got 0"),
    ("samples per shard not a number", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--samples-per-shard", "ten"], "argument --samples-per-shard: not an integer: 'ten'"),
    ("shard bytes abc", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--shard-bytes", "abc"], "argument --shard-bytes: not a size: 'abc'"),
    ("shard bytes 0", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--shard-bytes", "0"], "argument --shard-bytes: must be at least 2048 bytes, got '0'"),
    ("shard bytes bad unit", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--shard-bytes", "5iB"], "argument --shard-bytes: not a size: '5iB'"),
    ("both sizes", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--shard-bytes", "1MB", "--samples-per-shard", "5"], "argument --samples-per-shard: not allowed with argument --shard-bytes"),
    ("val fraction 1.5", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--val-fraction", "1.5"], "argument --val-fraction: must be a number in [0, 1), got '1.5'"),
    ("val fraction nan", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--val-fraction", "nan"], "argument --val-fraction: must be a number in [0, 1), got 'nan'"),
    ("val fraction negative", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--val-fraction", "-0.1"], "argument --val-fraction: must be a number in [0, 1), got '-0.1'"),
    ("seed negative", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    ("license unknown", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--license", "CC-BY-9.0"], "argument --license: 'CC-BY-9.0' is not an SPDX license id"),
    ("license expression", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--license", "MIT OR Apache-2.0"], "argument --license: 'MIT OR Apache-2.0' is not an SPDX license id"),
    ("workers 0", lambda w: ["--input", str(w["mined"]), "--output", str(w["new"]), "--workers", "0"], "argument --workers: must be >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(
    world: dict[str, Path], argv, message: str, capsys
) -> None:
    owned = ("mined", "release", "file", "photos", "empty", "uncommitted")
    before = {name: snapshot(world[name]) for name in owned}
    code, err = run_main(argv(world), capsys)
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(PREFIX) and message.format(tmp=world["tmp"]) in err, err
    assert {name: snapshot(world[name]) for name in owned} == before
    assert not world["new"].exists()
    assert not [p.name for p in world["tmp"].rglob(".*partial")], "no temporary folder is left behind"


def test_a_release_that_fails_validation_is_one_line(tmp_path: Path, capsys) -> None:
    from dataengine.schema import encode_sample
    from tests.release.mined_data import make_instances, write_mined_shard

    sample = encode_sample(make_instances(41)[0])
    sample["mask.png"] = sample["mask.png"][: len(sample["mask.png"]) // 2]  # opens, does not decode
    folder = tmp_path / "corrupt"
    write_mined_shard(folder, 0, [sample], [{"uri": "x", "status": "ok"}])
    code, err = run_main(["--input", str(folder), "--output", str(tmp_path / "r"), "--workers", "1"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"{PREFIX}the new release does not validate (") and "r.failed" in err


def test_command_line_and_make_never_show_a_traceback(world: dict[str, Path], repo_root: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataengine.release",
            "--input",
            str(world["file"]),
            "--output",
            str(world["new"]),
        ],
        capture_output=True,
        text=True,
        cwd=repo_root,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == f"{PREFIX}--input {world['file']}: is a file, not a mined folder\n"
    make = subprocess.run(
        ["make", "--no-print-directory", "-s", "shards", f"IN={world['mined']}", f"OUT={world['new']}",
         "SHARD_BYTES=abc", f"PY={sys.executable}"],
        capture_output=True,
        text=True,
        cwd=repo_root,
    )  # fmt: skip
    assert make.returncode != 0 and "Traceback" not in make.stderr
    [line] = [line for line in make.stderr.splitlines() if not line.startswith("make")]
    assert line.startswith(f"{PREFIX}argument --shard-bytes: not a size: 'abc'")
    assert not world["new"].exists()


def test_permission_problems_reported_by_the_os(world: dict[str, Path], monkeypatch, capsys) -> None:
    # The same two failures as above, on any account (root included): the OS's answers stand in
    # for the permission bits.
    import dataengine.release as release

    locked = world["tmp"] / "locked"
    locked.mkdir()
    real_access, real_listdir = os.access, os.listdir

    def access(path, mode, **kw):
        return False if Path(path) == locked else real_access(path, mode, **kw)

    def listdir(path):
        if Path(path) == world["mined"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(release.os, "access", access)
    monkeypatch.setattr(release.os, "listdir", listdir)
    code, err = run_main(["--input", str(world["mined"]), "--output", str(locked / "v1")], capsys)
    assert (
        code == 2 and err == f"{PREFIX}--output {locked}/v1: cannot write in {locked} (permission denied)\n"
    )
    code, err = run_main(["--input", str(world["mined"]), "--output", str(world["new"])], capsys)
    assert code == 2 and err == f"{PREFIX}--input {world['mined']}: cannot be listed (Permission denied)\n"
    assert not world["new"].exists()
