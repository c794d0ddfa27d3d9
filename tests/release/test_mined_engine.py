"""A release of a real mined tiny dataset: the engine's `sample` pipeline with the tiny zoo, then `make shards`.

Mining takes tens of seconds on CPU, so it runs once per session (module fixture) and every test
here reads that one output. The engine runs with `--backend local` (the same stages, no Ray
cluster to start on a shared 2-core machine); its Ray path is the engine's own tests' business.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dataengine.release import build_release
from dataengine.validate import validate_release

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_mined(tiny_zoo: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `sample` pipeline mined with the tiny profile into a temporary folder."""
    from dataengine.inputs import write_sample_images

    root = tmp_path_factory.mktemp("engine")
    write_sample_images(root / "images")
    out = root / "mined"
    cmd = [
        sys.executable, "dataengine/run.py", "--config", "pipelines.yaml", "--pipeline", "sample",
        "--profile", "tiny", "--input", str(root / "images"), "--output", str(out),
        "--backend", "local", "--no-progress",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mining failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert list(out.glob("*_stats.json")), "the engine committed no shard"
    return out


def test_release_of_a_mined_tiny_dataset(engine_mined: Path, tmp_path: Path) -> None:
    stats = [json.loads(p.read_text()) for p in sorted(engine_mined.glob("*_stats.json"))]
    mined_samples = sum(s["samples"] for s in stats)
    assert mined_samples > 0

    # The same folder given twice: every sample is a duplicate of itself and appears once.
    first = tmp_path / "r1"
    summary = build_release(
        [engine_mined, engine_mined], first, seed=3, val_fraction=0.3, samples_per_shard=3
    )
    assert sum(summary.counts.values()) == mined_samples
    assert summary.duplicates == mined_samples and summary.rejected == 0
    report = validate_release(first)
    assert report.ok, report.text()

    # Byte-identical when built again.
    second = tmp_path / "r2"
    build_release([engine_mined, engine_mined], second, seed=3, val_fraction=0.3, samples_per_shard=3)
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path.name

    # No source image in both splits; the card names the engine's pipeline and tiny models.
    rows = pq.read_table(first / "manifest.parquet").to_pylist()
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(row["source_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    card = (first / "README.md").read_text()
    assert "| sample |" in card and "tiny-models" in card

    # It streams with webdataset.
    keys = [
        s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in first.glob("*.tar")), shardshuffle=False)
    ]
    assert sorted(keys) == sorted(r["key"] for r in rows)


def test_a_shard_being_written_is_ignored(engine_mined: Path, tmp_path: Path) -> None:
    # A copy of the mined folder whose last shard lost its completion marker (a run still writing it).
    copy = tmp_path / "mined"
    shutil.copytree(engine_mined, copy)
    last = sorted(copy.glob("*_stats.json"))[-1]
    last.unlink()
    total = sum(json.loads(p.read_text())["samples"] for p in copy.glob("*_stats.json"))
    out = tmp_path / "r"
    summary = build_release([copy], out, seed=0, val_fraction=0.0, samples_per_shard=100, card=False)
    assert summary.counts == {"train": total}
    info = json.loads((out / "release.json").read_text())
    assert info["inputs"]["uncommitted_shards_skipped"] == [f"mined/{last.name[:6]}.tar"]
