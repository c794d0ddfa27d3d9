"""`dataengine.validate`: passes on a good release, names the file and sample of each kind of damage."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from dataengine.release import write_sums
from dataengine.validate import validate_release
from tests.release.tar_edit import Members, first_key, read_members, rewrite


def errors_of(root: Path) -> list[str]:
    report = validate_release(root)
    assert not report.ok
    return report.errors


def test_a_good_release_passes(release_dir: Path) -> None:
    report = validate_release(release_dir, workers=2)
    assert report.ok, report.text()
    assert report.text().startswith("OK ") and "train" in report.text()


def test_truncated_tar(release_copy) -> None:
    root = release_copy()
    tar = root / "train-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    errors = errors_of(root)
    assert any(e.startswith("train-000001.tar: truncated or corrupt tar after") for e in errors), errors
    assert "train-000001.tar: checksum mismatch" in " ".join(errors)
    assert any("count mismatch" in e and "train-000001.tar" in e for e in errors)
    # The command line exits non-zero with the same readable report.
    run = subprocess.run(
        [sys.executable, "-m", "dataengine.validate", str(root), "--workers", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert (
        run.stderr.startswith(f"INVALID {root}:")
        and "  - train-000001.tar: truncated or corrupt tar" in run.stderr
    )


def test_missing_field(release_copy) -> None:
    root = release_copy()
    key = first_key(read_members(root / "train-000001.tar"))
    rewrite(root, "train-000001.tar", lambda ms: [m for m in ms if m[0] != f"{key}.mask.png"])
    assert errors_of(root) == [f"train-000001.tar: sample {key}: missing field(s) mask.png"]


def test_mask_of_the_wrong_size(release_copy) -> None:
    root = release_copy()
    members = read_members(root / "val-000000.tar")
    key = first_key(members)

    def shrink(ms: Members) -> Members:
        out = []
        for name, data in ms:
            if name == f"{key}.mask.png":
                mask = Image.open(io.BytesIO(data))
                buf = io.BytesIO()
                mask.resize((mask.width // 2, mask.height)).save(buf, format="PNG")
                data = buf.getvalue()
            out.append((name, data))
        return out

    rewrite(root, "val-000000.tar", shrink)
    [error] = errors_of(root)
    assert (
        error.startswith(f"val-000000.tar: sample {key}: mask size (") and "differs from source size" in error
    )


def test_duplicate_key(release_copy) -> None:
    root = release_copy()
    donor = read_members(root / "train-000000.tar")
    key = first_key(donor)
    rewrite(root, "train-000002.tar", lambda ms: ms + [m for m in donor if m[0].startswith(f"{key}.")])
    errors = errors_of(root)
    assert f"duplicate key {key}: in train-000000.tar and train-000002.tar" in errors
    assert any(
        e.startswith("train.index.json: count mismatch: train-000002.tar nsamples is 8") for e in errors
    )


def test_source_in_both_splits(release_copy) -> None:
    root = release_copy()
    donor = read_members(root / "val-000000.tar")
    key = first_key(donor)
    rewrite(root, "train-000000.tar", lambda ms: ms + [m for m in donor if m[0].startswith(f"{key}.")])
    errors = errors_of(root)
    source = key.rsplit("-", 1)[0]
    assert any(e.startswith(f"source {source} is in both splits") for e in errors), errors


def test_checksum_mismatch(release_copy) -> None:
    root = release_copy()
    with open(root / "README.md", "a") as fh:
        fh.write("edited after release\n")
    [error] = errors_of(root)
    assert error.startswith("README.md: checksum mismatch (SHA256SUMS says ")


def test_file_not_in_sums_and_listed_file_missing(release_copy) -> None:
    root = release_copy()
    (root / "notes.txt").write_text("extra")
    (root / "card" / "scores.png").unlink()
    assert errors_of(root) == [
        "notes.txt: not listed in SHA256SUMS",
        "card/scores.png: listed in SHA256SUMS but missing",
    ]


def test_index_count_mismatch(release_copy) -> None:
    root = release_copy()
    path = root / "train.index.json"
    index = json.loads(path.read_text())
    index["shardlist"][0]["nsamples"] += 1
    path.write_text(json.dumps(index))
    write_sums(root)
    assert errors_of(root) == [
        "train.index.json: count mismatch: train-000000.tar nsamples is 9 but the tar holds 8"
    ]


def test_manifest_count_mismatch(release_copy) -> None:
    root = release_copy()
    table = pq.read_table(root / "manifest.parquet")
    dropped = table.slice(0, 1).to_pylist()[0]
    pq.write_table(table.slice(1), root / "manifest.parquet")
    write_sums(root)
    errors = errors_of(root)
    assert (
        f"manifest.parquet: count mismatch: 7 row(s) for {dropped['shard']}, but the tar holds 8 sample(s)"
        in errors
    )
    assert f"manifest.parquet: no row for {dropped['key']} (in {dropped['shard']})" in errors


def test_missing_index_and_manifest(release_copy) -> None:
    root = release_copy()
    (root / "val.index.json").unlink()
    (root / "manifest.parquet").unlink()
    write_sums(root)
    assert errors_of(root) == [
        "val.index.json: missing (the wids index of split val)",
        "manifest.parquet: missing",
    ]
