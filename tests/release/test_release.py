"""The release tool: contents, dedupe, split by source, seeded shuffle, sharding, determinism, card."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.release import (
    RELEASE_JSON,
    ReleaseError,
    build_release,
    main,
    scan_inputs,
    split_of,
    tar_members,
)
from dataengine.schema import encode_sample
from dataengine.validate import validate_release
from tests.release.mined_data import expected_keys, make_instances, mined_shard, write_mined_shard


def tar_keys(path: Path) -> list[str]:
    """The sample keys of a tar, in order (members grouped by key)."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def release_keys(root: Path) -> dict[str, list[str]]:
    """split -> keys in release order."""
    out: dict[str, list[str]] = {}
    for tar in sorted(root.glob("*.tar")):
        out.setdefault(tar.name.split("-")[0], []).extend(tar_keys(tar))
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_matches_tarfile(fmt: int, tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    long = "d/" * 60 + "x.txt" if fmt != tarfile.USTAR_FORMAT else "d/" * 40 + "x.txt"
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in [
            (long, b"hello"),
            ("dir", None),
            ("\u00e9-0.json", b"{}" * 300),
            ("big.bin", b"\1" * 5000),
        ]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    with open(path, "rb") as fh:
        assert list(tar_members(fh)) == expected
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01  # a flipped bit in the first header's name: its checksum no longer matches
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    with open(damaged, "rb") as fh, pytest.raises(tarfile.ReadError, match="bad header checksum at byte 0"):
        list(tar_members(fh))
    damaged.write_bytes(path.read_bytes()[: expected[1][1] - 400])  # ends inside a later header block
    with open(damaged, "rb") as fh, pytest.raises(tarfile.ReadError, match="ends inside a header"):
        list(tar_members(fh))


def test_release_holds_each_committed_sample_once(release_dir: Path, expected: set[str]) -> None:
    keys = [k for ks in release_keys(release_dir).values() for k in ks]
    assert len(keys) == len(set(keys))
    # Uncommitted shards (no _stats.json) are ignored; the 4 sources mined twice appear once.
    assert set(keys) == expected
    info = json.loads((release_dir / RELEASE_JSON).read_text())
    assert info["inputs"]["duplicates_dropped"] == len(expected_keys([8, 9, 10, 11]))
    assert info["inputs"]["uncommitted_shards_skipped"] == ["a/000002.tar", "a/000003.tar"]
    assert info["inputs"]["conflicting_duplicates"] == []
    assert info["inputs"]["rejected"] == 0


def test_release_is_valid(release_dir: Path) -> None:
    report = validate_release(release_dir)
    assert report.ok, report.text()
    assert sum(report.samples.values()) == 36


def test_no_source_in_both_splits(release_dir: Path) -> None:
    table = pq.read_table(release_dir / "manifest.parquet").to_pylist()
    splits_of_source: dict[str, set[str]] = {}
    for row in table:
        splits_of_source.setdefault(row["source_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of_source.values())
    counts = Counter(next(iter(s)) for s in splits_of_source.values())
    assert counts["train"] > 0 and counts["val"] > 0


def test_split_is_by_seeded_hash_and_stable_when_data_grows() -> None:
    ids = [f"{i:016x}" for i in range(2000)]
    val = [s for s in ids if split_of(s, 3, 0.25) == "val"]
    assert 0.2 < len(val) / len(ids) < 0.3
    assert val != [s for s in ids if split_of(s, 4, 0.25) == "val"]
    assert all(split_of(s, 3, 0.0) == "train" for s in ids)


def test_same_inputs_give_byte_identical_release(
    mined: tuple[Path, Path], release_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "elsewhere" / "v1-again"
    build_release(mined, again, seed=7, val_fraction=0.3, samples_per_shard=8)
    files = sorted(p.relative_to(release_dir) for p in release_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (release_dir / rel).read_bytes() == (again / rel).read_bytes(), f"{rel} differs"
    assert not list(tmp_path.glob("elsewhere/.*")), "no temporary folder is left behind"


def test_shuffle_is_seeded_and_mixes_sources(
    mined: tuple[Path, Path], release_dir: Path, tmp_path: Path
) -> None:
    train = release_keys(release_dir)["train"]
    assert train != sorted(train)
    # Instances of one source image are spread out, not written next to each other.
    sources = [k.rsplit("-", 1)[0] for k in train]
    adjacent_same = sum(a == b for a, b in zip(sources, sources[1:]))
    assert adjacent_same < len(sources) // 3
    other = tmp_path / "seed8"
    build_release(mined, other, seed=8, val_fraction=0.3, samples_per_shard=8, card=False)
    assert release_keys(other) != release_keys(release_dir)


def test_fixed_sample_count_shards(release_dir: Path) -> None:
    index = json.loads((release_dir / "train.index.json").read_text())
    counts = [s["nsamples"] for s in index["shardlist"]]
    assert counts[:-1] == [8] * (len(counts) - 1) and 1 <= counts[-1] <= 8
    assert [s["url"] for s in index["shardlist"]] == [f"train-{i:06d}.tar" for i in range(len(counts))]
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1


def test_byte_size_shards(mined: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "bytes"
    limit = 60_000
    build_release(mined, out, seed=1, val_fraction=0.0, samples_per_shard=None, shard_bytes=limit, card=False)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) > 3 and all(t.name.startswith("train-") for t in tars)
    for tar in tars:
        # tarfile pads the archive to a 10240-byte record; the samples themselves stay within the limit.
        assert tar.stat().st_size <= limit + 10240 or len(tar_keys(tar)) == 1
    assert not (out / "val.index.json").exists()
    assert validate_release(out).ok


def test_manifest_rows_match_samples(release_dir: Path) -> None:
    rows = pq.read_table(release_dir / "manifest.parquet").to_pylist()
    assert len(rows) == 36
    by_key = {q.key: q for i in [*range(12), 20, 21, 22] for q in make_instances(i)}
    for row in rows:
        q = by_key[row["key"]]
        assert row["split"] == row["shard"].split("-")[0]
        assert row["caption"] == q.text and row["tag"] == q.meta.tag
        assert row["box_xyxy"] == q.meta.box_xyxy
        assert (row["width"], row["height"]) == q.source.size
        assert (row["subject_width"], row["subject_height"]) == q.subject.size
        assert row["mask_area_frac"] == pytest.approx(q.meta.mask_area_frac)
        assert tar_keys(release_dir / row["shard"])[row["index_in_shard"]] == row["key"]


def test_card_has_counts_models_plots_and_no_clock(release_dir: Path) -> None:
    card = (release_dir / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card and "path: val-*.tar" in card
    assert "| **total** | **36** | **15** |" in card
    assert "grounding: `tiny/grounding-dino`" in card and "`0123456789abcdef`" in card
    assert (
        "2 uncommitted shard(s) skipped" in card
        and "duplicates dropped (same key, first input wins): 10" in card
    )
    for name in ("tags", "mask_area", "caption_length", "scores"):
        path = release_dir / "card" / f"{name}.png"
        assert f"(card/{name}.png)" in card
        img = Image.open(path)
        assert img.format == "PNG" and img.size[0] > 300
        assert b"Software" not in path.read_bytes() and b"tIME" not in path.read_bytes()
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}", card), "the card holds a date or a time"


def test_bad_samples_are_rejected_with_reasons(tmp_path: Path) -> None:
    good = [encode_sample(q) for q in make_instances(30)]
    q = make_instances(31)[0]
    q.mask = q.mask.resize((q.mask.width + 3, q.mask.height))
    wrong_mask = _encode_unchecked(q)
    no_caption = dict(encode_sample(make_instances(32)[0]))
    del no_caption["txt"]
    folder = tmp_path / "bad"
    write_mined_shard(folder, 0, [*good, wrong_mask, no_caption], [{"uri": "x", "status": "ok"}])
    scan = scan_inputs([folder])
    assert {r.key: r.kind for r in scan.rejected} == {
        wrong_mask["__key__"]: "mask size differs from source",
        no_caption["__key__"]: "missing field",
    }
    out = tmp_path / "release"
    summary = build_release([folder], out, seed=0, val_fraction=0.0, samples_per_shard=100)
    assert summary.rejected == 2 and summary.counts == {"train": len(good)}
    info = json.loads((out / RELEASE_JSON).read_text())
    assert info["inputs"]["rejected_by_reason"] == {"mask size differs from source": 1, "missing field": 1}
    assert any(no_caption["__key__"] in s and "txt" in s for s in info["inputs"]["rejected_samples"])


def _encode_unchecked(q) -> dict:
    """encode_sample without its contract check: how a broken writer would have written the sample."""
    out = {"__key__": q.key}
    for name, img, fmt in (
        ("source.jpg", q.source, "JPEG"),
        ("mask.png", q.mask, "PNG"),
        ("subject.png", q.subject, "PNG"),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    out["txt"] = q.text.encode()
    out["json"] = q.meta.model_dump_json().encode()
    return out


def test_a_corrupt_committed_tar_keeps_its_good_samples(tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    tar = mined_shard(folder, 0, range(60, 66))
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * 0.6)])  # disk damage after the shard was committed
    out = tmp_path / "release"
    summary = build_release([folder], out, seed=0, val_fraction=0.0, samples_per_shard=100, card=False)
    info = json.loads((out / RELEASE_JSON).read_text())
    assert summary.rejected >= 1 and info["inputs"]["rejected_by_reason"].get("corrupt tar", 0) >= 1
    kept = set(tar_keys(out / "train-000000.tar"))
    assert kept and kept < expected_keys(range(60, 66))
    assert validate_release(out).ok


def test_a_release_that_fails_validation_is_not_published(tmp_path: Path) -> None:
    sample = encode_sample(make_instances(40)[0])
    png = sample["mask.png"]
    sample["mask.png"] = png[: len(png) // 2]  # the header opens, the pixels do not decode
    folder = tmp_path / "corrupt"
    write_mined_shard(folder, 0, [sample], [{"uri": "x", "status": "ok"}])
    out = tmp_path / "release"
    with pytest.raises(
        ReleaseError, match=rf"does not validate.*{sample['__key__']}: does not decode"
    ) as err:
        build_release([folder], out, seed=0, val_fraction=0.0, samples_per_shard=10, card=False)
    assert "\n" not in str(err.value) and "release.failed" in str(err.value)
    assert not err.value.report.ok  # the whole report, for callers that want every problem
    assert not out.exists()
    assert (tmp_path / "release.failed" / "train-000000.tar").is_file()


def test_bad_options_and_inputs_fail_clearly(mined: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="does not exist"):
        build_release([tmp_path / "nope"], tmp_path / "o")
    empty = tmp_path / "empty"
    mined_shard(empty, 0, [50], commit=False)
    with pytest.raises(ReleaseError, match="holds no committed shard"):
        build_release([empty], tmp_path / "o")
    with pytest.raises(ReleaseError, match="val-fraction"):
        build_release(mined, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(ReleaseError, match="exactly one of"):
        build_release(mined, tmp_path / "o", samples_per_shard=10, shard_bytes=10_000)
    with pytest.raises(ReleaseError, match="--license"):
        build_release(mined, tmp_path / "o", license="CC-BY-4.0 OR MIT")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ReleaseError, match="--overwrite"):
        build_release(mined, tmp_path / "exists")
    assert not (tmp_path / "o").exists()


def test_cli_builds_overwrites_and_validates(mined: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["--input", *map(str, mined), "--output", str(out), "--seed", "7", "--val-fraction", "0.3"]
    assert main([*args, "--samples-per-shard", "8", "--workers", "1"]) == 0
    assert "release written to" in capsys.readouterr().out
    assert main([*args, "--samples-per-shard", "8", "--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--shard-bytes", "100KB", "--overwrite", "--workers", "2"]) == 0
    capsys.readouterr()
    assert json.loads((out / RELEASE_JSON).read_text())["params"]["shard_bytes"] == 100_000
    from dataengine.validate import main as validate_main

    assert validate_main([str(out), "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_license_comes_from_the_release_options(
    mined: tuple[Path, Path], release_dir: Path, tmp_path: Path, capsys
) -> None:
    # Not given: "other", said plainly in release.json and on the card.
    info = json.loads((release_dir / RELEASE_JSON).read_text())
    assert info["params"]["license"] == "other"
    card = (release_dir / "README.md").read_text()
    assert "\nlicense: other\n" in card and "No license was declared for this release" in card

    # Given on the command line in any letter case: stored canonical, on the card as the hub's id.
    out = tmp_path / "licensed"
    args = ["--input", *map(str, mined), "--output", str(out), "--seed", "7", "--val-fraction", "0.3"]
    assert main([*args, "--samples-per-shard", "8", "--workers", "1", "--license", "cc-by-nc-4.0"]) == 0
    capsys.readouterr()
    info = json.loads((out / RELEASE_JSON).read_text())
    assert info["params"]["license"] == "CC-BY-NC-4.0"
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "license: cc-by-nc-4.0\n" in front and "other" not in front
    assert "Released under [CC-BY-NC-4.0](https://spdx.org/licenses/CC-BY-NC-4.0.html)" in card
    assert "--license CC-BY-NC-4.0`" in card
    assert validate_release(out).ok

    # Everything else about the release is the same bytes: the license only touches its own fields.
    for name in ("train-000000.tar", "manifest.parquet", "train.index.json"):
        assert (out / name).read_bytes() == (release_dir / name).read_bytes()
