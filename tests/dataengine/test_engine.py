"""The engine end to end: the sample pipeline on Ray (from the command line), a malformed-input corpus, and kill -9 then resume."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dataengine import run
from dataengine.engine import mine, stage_groups
from dataengine.schema import KEY_PATTERN, decode_sample

from .conftest import malformed_corpus, noise_image, tiny_config


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} over every committed tar; fails on a key seen twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            assert key not in samples, f"{key} written twice"
            samples[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


# Ray's own log lines (python `2026-01-01 10:00:00,000\tWARNING ...`, C++ `[2026-01-01 10:00:00,000 E ...]`).
RAY_LOG_LINE = r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.mark.ray
def test_sample_pipeline_on_ray_from_the_command_line(repo_root, sample_images, reference_run, sample_cfg, tmp_path):
    """`dataengine/run.py` on its own embedded Ray: the plain loop's bytes, quiet, and every reader reads them."""
    import re

    # A `ray start` that is gone left its address behind: the embedded Ray must not try to join it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets live under it
    (ray_tmp / "ray").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{s.getsockname()[1]}")
    env = {**os.environ, "LARGEN_RAY_NUM_CPUS": "2", "RAY_TMPDIR": str(ray_tmp)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # as in a fresh shell: the embedded Ray's own defaults
        env.pop(key, None)
    out = tmp_path / "mined"
    cmd = [sys.executable, "dataengine/run.py", "--config", "pipelines.yaml", "--pipeline", "sample", "--profile", "tiny",
           "--input", str(sample_images), "--output", str(out), "--no-progress",
           "--set", "inputs.0.images_per_shard=2"]  # a list index in --set  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 shard(s) written" in proc.stdout  # 6 photos, 2 per shard
    assert "caption" in proc.stdout and "over_max_instances" in proc.stdout  # the summary table
    noise = [line for line in proc.stderr.splitlines() if re.match(RAY_LOG_LINE, line) or "ray_remote_args" in line]
    assert not noise, proc.stderr[-3000:]

    # Byte-identical to the plain in-process loop (same stage objects, same per-shard batches).
    for ref in sorted(reference_run.iterdir()):
        if ref.suffix in (".tar", ".parquet"):
            assert (out / ref.name).read_bytes() == ref.read_bytes(), ref.name

    # Every image yields samples; webdataset reads them; modes survive.
    assert {r["status"] for r in rows(out)} == {"ok"}
    samples = read_samples(out)
    assert len(samples) == sum(json.loads(p.read_text())["samples"] for p in out.glob("*_stats.json")) > 0
    for key, fields in samples.items():
        assert KEY_PATTERN.match(key)
        assert Image.open(io.BytesIO(fields["mask.png"])).mode == "L"
        assert Image.open(io.BytesIO(fields["subject.png"])).mode == "RGBA"
        quad = decode_sample({"__key__": key, **fields})
        assert quad.mask.size == quad.source.size
        assert quad.meta.pipeline == "sample" and quad.meta.config_hash == sample_cfg.config_hash()
    decoded = next(iter(wds.WebDataset(str(out / "000000.tar"), shardshuffle=False).decode("pil")))
    assert decoded["subject.png"].size == Image.open(io.BytesIO(samples[decoded["__key__"]]["subject.png"])).size

    # Hugging Face datasets loads the shards.
    import datasets

    ds = datasets.load_dataset(
        "webdataset", data_files={"train": [str(p) for p in sorted(out.glob("*.tar"))]}, split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.num_rows == len(samples)
    assert {"source.jpg", "mask.png", "subject.png", "txt", "json"} <= set(ds.column_names)
    assert ds[0]["mask.png"].mode == "L" and ds[0]["subject.png"].mode == "RGBA"


def test_per_stage_layout_writes_the_same_shards(sample_cfg, reference_run, ray_local, tmp_path):
    """`engine.layout: per_stage` (one pool per model) changes placement, not bytes, against the
    `sample` pipeline's fused layout (one pool, every replica holds all models)."""
    assert [g.name for g in stage_groups(sample_cfg)] == ["fused"]
    per_stage = sample_cfg.model_copy(deep=True)
    per_stage.pipeline.engine.layout = "per_stage"
    assert [g.name for g in stage_groups(per_stage)] == ["tag", "ground", "segment", "caption"]
    assert per_stage.config_hash() == sample_cfg.config_hash()
    out = tmp_path / "mined"
    summary = mine(per_stage, out, backend="ray", progress=False)
    assert summary.shards_written == 3 and summary.samples > 0
    for ref in sorted(reference_run.iterdir()):
        if ref.suffix in (".tar", ".parquet"):
            assert (out / ref.name).read_bytes() == ref.read_bytes(), ref.name


def test_malformed_inputs_get_one_row_each_and_the_run_goes_on(repo_root, tiny_zoo, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    kinds = malformed_corpus(corpus)
    # The EXIF-rotated image's upright pixels, stored losslessly: boxes and masks must be the same.
    from dataengine.images import decode_image

    upright = decode_image((corpus / "exif_rotated.jpg").read_bytes(), max_pixels=10**8)
    Image.fromarray(upright).save(corpus / "exif_upright_twin.png")
    out = tmp_path / "mined"
    code = run.main(
        [
            "--config", str(repo_root / "pipelines.yaml"), "--pipeline", "sample", "--profile", "tiny",
            "--input", str(corpus), "--output", str(out), "--backend", "local", "--no-progress",
            "--set", "limits.max_pixels=40000", "--set", "output.max_side=1024",
            # The upright twin is a near duplicate of exif_rotated.jpg (same pixels): mined both, to compare.
            "--set", "dedup.enabled=false",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "failed" in printed and "drop reason" in printed

    by_name = {Path(r["uri"]).name: r for r in rows(out)}
    assert set(by_name) == set(kinds) | {"exif_upright_twin.png"}  # exactly one row per input image
    failed = {name: r["error"] for name, r in by_name.items() if r["status"] == "failed"}
    assert failed == {
        "zero_byte.jpg": "read: empty file (0 bytes)",
        "truncated.jpg": failed["truncated.jpg"],
        "not_an_image.png": "read: not an image (format not recognised)",
        "one_pixel.png": "read: image is 1x1, smaller than limits.min_side=8",
        "huge.png": failed["huge.png"],
    }
    assert "truncated" in failed["truncated.jpg"] and "max_pixels=40000" in failed["huge.png"]
    usable = {"good_a.png", "good_b.jpg", "cmyk.jpg", "sixteen_bit.png", "palette_transparent.png", "grayscale.png",
              "exif_rotated.jpg", "exif_upright_twin.png", "animated.png"}  # fmt: skip
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == usable

    samples = read_samples(out)
    by_source = {}
    for fields in samples.values():
        meta = json.loads(fields["json"])
        by_source.setdefault(Path(meta["uri"]).name, []).append((meta, fields))
    rotated, twin = by_source["exif_rotated.jpg"], by_source["exif_upright_twin.png"]
    assert Image.open(io.BytesIO(rotated[0][1]["source.jpg"])).size == (48, 80)  # upright: W 48, H 80
    assert [m["box_xyxy"] for m, _ in rotated] == [m["box_xyxy"] for m, _ in twin]
    assert [f["mask.png"] for _, f in rotated] == [f["mask.png"] for _, f in twin]
    for meta, fields in rotated:
        assert Image.open(io.BytesIO(fields["mask.png"])).size == (48, 80)
        x0, y0, x1, y1 = meta["box_xyxy"]
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 80


def _committed_tars_are_whole(out: Path) -> None:
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                assert len(t.extractfile(member).read()) == member.size


@pytest.mark.ray
def test_kill_9_then_resume_equals_an_uninterrupted_run(repo_root, sample_images, ray_local, tmp_path):
    # The six photos and 30 generated images, 2 per shard: the run commits its 18 shards in bursts
    # over ~0.7 s (measured), 14 polls of this test, so the kill lands mid-run even when the poll
    # runs late on a loaded machine (six 1-image shards were all committed within 0.2 s).
    images = tmp_path / "images"
    shutil.copytree(sample_images, images)
    for i in range(30):
        noise_image(96 + 2 * i, 64 + i, seed=100 + i).save(images / f"noise-{i:02d}.png")
    overrides = [f"inputs=[{{kind: images, path: '{images}', images_per_shard: 2}}]"]
    cfg = tiny_config(repo_root, overrides=tuple(overrides))
    reference = tmp_path / "reference"
    mine(cfg, reference, backend="local", progress=False)

    # A real mine (its own embedded Ray), SIGKILLed as soon as one shard is committed.
    out = tmp_path / "killed"
    args = [
        "--config", str(repo_root / "pipelines.yaml"), "--pipeline", "sample", "--profile", "tiny",
        "--output", str(out), "--no-progress", "--set", overrides[0],
    ]  # fmt: skip
    env = {**os.environ, "LARGEN_RAY_NUM_CPUS": "2"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(repo_root / "dataengine" / "run.py"), *args],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*_stats.json")):
            _committed_tars_are_whole(out)  # never a partial tar under a final name
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the embedded Ray's processes of the killed driver
            os.killpg(proc.pid, signal.SIGKILL)
    committed_before = len(list(out.glob("*_stats.json")))
    assert 1 <= committed_before < 18
    _committed_tars_are_whole(out)

    # Restart (on this session's Ray): committed shards are skipped, the rest is mined.
    code = run.main(args)
    assert code == 0
    assert not list(out.glob(".*.tmp"))
    assert len(list(out.glob("*_stats.json"))) == 18
    assert read_samples(out) == read_samples(reference)  # same keys, same bytes: none lost, none twice
    assert rows(out) == rows(reference)


def test_run_reports_config_and_input_problems_with_status_2(repo_root, tiny_zoo, tmp_path, capsys):
    base = ["--config", str(repo_root / "pipelines.yaml"), "--profile", "tiny", "--output", str(tmp_path / "o")]
    assert run.main([*base, "--pipeline", "nope"]) == 2
    assert "pipeline 'nope' is not defined" in capsys.readouterr().err
    assert run.main([*base, "--pipeline", "sample", "--set", "ground.box_treshold=1"]) == 2
    assert "ground.box_treshold: unknown key" in capsys.readouterr().err
    assert run.main([*base, "--pipeline", "sample", "--input", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/data/photos", "images"), ("s3://b/shards/{000..009}.tar", "webdataset"), ("x.tar", "webdataset"),
     ("list.parquet", "table"), ("urls.CSV", "table")],
)  # fmt: skip
def test_input_flag_guesses_the_kind(path, kind):
    assert run.input_spec(path, 4).kind == kind
