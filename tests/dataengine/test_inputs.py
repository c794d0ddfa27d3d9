"""Input discovery: folders, WebDataset tars and tables are listed in a stable order and cut into the same shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.config import InputSpec
from dataengine.inputs import InputError, plan_shards, read_bytes

from .conftest import noise_image, png_bytes


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, rel in enumerate(["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", "sub/e.bmp"]):
        path = root / rel
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP"}.get(rel.rsplit(".", 1)[1].lower())
        if fmt is None:
            path.write_text("not an image")
        else:
            noise_image(20, 16, i).save(path, format=fmt)
    return root


def test_folder_is_recursive_sorted_and_filtered(folder: Path):
    shards = plan_shards([InputSpec(kind="images", path=str(folder), images_per_shard=2)])
    uris = [it.uri for s in shards for it in s.items]
    rel = [str(Path(u).relative_to(folder)) for u in uris]
    assert rel == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.tiff", "sub/e.bmp"]
    assert [len(s.items) for s in shards] == [2, 2, 1]
    assert [s.name for s in shards] == ["000000", "000001", "000002"]
    assert read_bytes(shards[0].items[1]) == (folder / "b.png").read_bytes()


def test_same_inputs_same_shards(folder: Path):
    spec = InputSpec(kind="images", path=str(folder), images_per_shard=2)
    a, b = plan_shards([spec]), plan_shards([spec])
    assert a == b
    assert [s.fingerprint() for s in a] == [s.fingerprint() for s in b]
    assert len({s.fingerprint() for s in a}) == len(a)


def test_each_input_is_cut_on_its_own(folder: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    noise_image(20, 16, 9).save(other / "x.png")
    first = plan_shards([InputSpec(kind="images", path=str(folder), images_per_shard=2)])
    both = plan_shards(
        [InputSpec(kind="images", path=str(folder), images_per_shard=2), InputSpec(kind="images", path=str(other))]
    )
    assert both[: len(first)] == first
    assert both[-1].index == len(first) and both[-1].items[0].uri.endswith("x.png")


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_like_img2dataset(tmp_path: Path):
    images = [png_bytes(noise_image(20, 16, i)) for i in range(3)]
    _tar(
        tmp_path / "00000.tar",
        [
            {"__key__": "000000000", "jpg": images[0], "json": json.dumps({"url": "http://x/0"}).encode(), "txt": b"a"},
            {"__key__": "000000001", "json": b"{}"},  # failed download: no image
        ],
    )
    _tar(tmp_path / "00001.tar", [{"__key__": "000010000", "png": images[1]}, {"__key__": "000010001", "jpg": images[2]}])
    shards = plan_shards([InputSpec(kind="webdataset", path=str(tmp_path / "{00000..00001}.tar"), images_per_shard=8)])
    items = shards[0].items
    assert [it.uri.rsplit("/", 1)[1] for it in items] == [
        "00000.tar#000000000.jpg",
        "00001.tar#000010000.png",
        "00001.tar#000010001.jpg",
    ]
    assert [read_bytes(it) for it in items] == images
    only_png = plan_shards([InputSpec(kind="webdataset", path=str(tmp_path / "*.tar"), image_field="png")])
    assert [read_bytes(it) for it in only_png[0].items] == [images[1]]


def test_tables_parquet_and_csv(tmp_path: Path):
    for i in range(3):
        noise_image(20, 16, i).save(tmp_path / f"img{i}.png")
    pq.write_table(pa.table({"path": ["img2.png", str(tmp_path / "img0.png"), None]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("image,caption\nimg1.png,hello\n")
    shards = plan_shards(
        [
            InputSpec(kind="table", path=str(tmp_path / "list.parquet"), image_column="path"),
            InputSpec(kind="table", path=str(tmp_path / "list.csv")),
        ]
    )
    assert [it.uri for s in shards for it in s.items] == ["img2.png", str(tmp_path / "img0.png"), "img1.png"]
    assert read_bytes(shards[1].items[0]) == (tmp_path / "img1.png").read_bytes()


def test_bad_inputs_are_clear_errors(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        plan_shards([InputSpec(kind="images", path=str(tmp_path / "missing"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image"):
        plan_shards([InputSpec(kind="images", path=str(tmp_path / "empty"))])
    (tmp_path / "t.csv").write_text("url\nx.png\n")
    with pytest.raises(InputError, match=r"has no column 'image' \(set image_column\); columns: url"):
        plan_shards([InputSpec(kind="table", path=str(tmp_path / "t.csv"))])
    with pytest.raises(InputError, match="matches no tar file"):
        plan_shards([InputSpec(kind="webdataset", path=str(tmp_path / "*.tar"))])


def test_fsspec_memory_folder():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/lar-gen-test/in/a.png", png_bytes(noise_image(20, 16, 1)))
    shards = plan_shards([InputSpec(kind="images", path="memory://lar-gen-test/in")])
    assert shards[0].items[0].uri == "memory:///lar-gen-test/in/a.png"
    assert read_bytes(shards[0].items[0]) == fs.cat("/lar-gen-test/in/a.png")
