"""A release loads with webdataset, wids and Hugging Face datasets, images in their modes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dataengine.schema import decode_sample


def manifest_by_key(root: Path) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(root / "manifest.parquet").to_pylist()}


def pil_keep_mode(key: str, data: bytes) -> Image.Image | None:
    """A webdataset decoder for images that keeps their mode (`decode("pil")` makes every image RGB)."""
    if key.endswith((".jpg", ".png")):
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    return None


def test_webdataset_streams_the_release(release_dir: Path) -> None:
    rows = manifest_by_key(release_dir)
    urls = [str(p) for p in sorted(release_dir.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode(pil_keep_mode))
    assert len(samples) == sum(r["split"] == "train" for r in rows.values())
    for s in samples:
        assert s["source.jpg"].mode == "RGB"
        assert s["mask.png"].mode == "L" and s["mask.png"].size == s["source.jpg"].size
        assert s["subject.png"].mode == "RGBA"
        assert s["txt"] == rows[s["__key__"]]["caption"]
        assert s["json"]["tag"] == rows[s["__key__"]]["tag"]
    # Raw bytes decode through the project's one contract, too.
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    assert decode_sample(raw).key == raw["__key__"]


@pytest.mark.filterwarnings("ignore:String specifications for transformations:UserWarning")
def test_wids_index_gives_random_access(release_dir: Path, tmp_path: Path) -> None:
    import wids

    index = release_dir / "val.index.json"
    ds = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "wids-cache"))
    shardlist = json.loads(index.read_text())["shardlist"]
    assert len(ds) == sum(s["nsamples"] for s in shardlist)
    rows = manifest_by_key(release_dir)
    last = ds[len(ds) - 1]
    assert last["__key__"] in rows and rows[last["__key__"]]["split"] == "val"
    assert last[".mask.png"].mode == "L" and last[".subject.png"].mode == "RGBA"


def test_hf_datasets_loads_the_release(release_dir: Path, tmp_path: Path) -> None:
    import datasets

    files = {"train": sorted(str(p) for p in release_dir.glob("train-*.tar"))}
    ds = datasets.load_dataset("webdataset", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    rows = manifest_by_key(release_dir)
    assert len(ds) == sum(r["split"] == "train" for r in rows.values())
    sample = ds[0]
    assert sample["mask.png"].mode == "L" and sample["subject.png"].mode == "RGBA"
    assert sample["source.jpg"].mode == "RGB" and sample["mask.png"].size == sample["source.jpg"].size
    assert sample["txt"] == rows[sample["__key__"]]["caption"]

    # The card's front matter maps the tars to HF splits: the folder itself loads.
    both = datasets.load_dataset(str(release_dir), cache_dir=str(tmp_path / "hf2"))
    assert set(both) == {"train", "validation"}
    assert len(both["validation"]) == sum(r["split"] == "val" for r in rows.values())
