"""`dataengine.validate` against damaged releases, table-driven: every file kind of a release
(shard tars and their members, the wids indexes, the manifest, SHA256SUMS, release.json) is
truncated, given the wrong type or encoding, or missing or extra fields, and each damage must be a
one-line finding naming the file (and the field, sample or row), never a crash; the command line
exits 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.release import write_sums
from dataengine.validate import main as validate_main
from dataengine.validate import validate_release
from tests.release.tar_edit import (
    Members,
    bomb_png,
    field_of,
    first_key,
    png_bytes,
    replace_field,
    rewrite,
)

TAR = "train-000001.tar"


def _edit_first(field: str, new: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Damage: replace one field of the first sample of TAR (re-summed, so only that damage shows)."""

    def damage(root: Path) -> None:
        def edit(ms: Members) -> Members:
            key = first_key(ms)
            return replace_field(ms, key, field, new(field_of(ms, key, field)))

        rewrite(root, TAR, edit)

    return damage


def _edit_meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def new(data: bytes) -> bytes:
        meta = json.loads(data)
        return json.dumps(change(meta)).encode()

    return _edit_first("json", new)


def _without(meta: dict, key: str) -> dict:
    return {k: v for k, v in meta.items() if k != key}


def _rename_first(name: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        def edit(ms: Members) -> Members:
            key = first_key(ms)
            return [(name(n) if n.startswith(f"{key}.") else n, d) for n, d in ms]

        rewrite(root, TAR, edit)

    return damage


def _write(name: str, data: bytes | Callable[[bytes], bytes], resum: bool = True) -> Callable[[Path], None]:
    """Damage: overwrite a file of the release (with bytes, or a function of its bytes)."""

    def damage(root: Path) -> None:
        path = root / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
        if resum:
            write_sums(root)

    return damage


def _json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    return _write(name, lambda b: json.dumps(change(json.loads(b))).encode())


def _set(doc: dict, path: str, value: object) -> dict:
    """`doc` with the dotted `path` set to `value` (`__del__` deletes it)."""
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value == "__del__":
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def _folder(name: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / name).unlink()
        (root / name).mkdir()
        (root / name / "x").write_text("x")

    return damage


def _dangling(name: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / name).unlink()
        os.symlink(root / "no-such-file", root / name)

    return damage


def _manifest(change: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / "manifest.parquet"
        pq.write_table(change(pq.read_table(path)), path)
        write_sums(root)

    return damage


def _set_column(name: str, values: Callable[[list], list], type_: pa.DataType | None = None):
    def change(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index(name)
        column = pa.array(values(table.column(name).to_pylist()), type=type_ or table.schema.field(i).type)
        return table.set_column(i, name, column)

    return _manifest(change)


def _mask_rgb(data: bytes) -> bytes:
    import io

    return png_bytes(Image.open(io.BytesIO(data)).convert("RGB"))


def _mask_grey(data: bytes) -> bytes:
    import io

    mask = Image.open(io.BytesIO(data))
    mask.putpixel((0, 0), 128)
    return png_bytes(mask)


# (case id, damage, file the finding names, text the finding holds)
CASES: list[tuple[str, Callable[[Path], None], str, str]] = [
    # shard tars
    ("tar truncated", _write(TAR, lambda b: b[: len(b) // 3]), TAR, "truncated or corrupt tar after"),
    ("tar empty file", _write(TAR, b""), TAR, "truncated or corrupt tar after 0 complete sample(s): empty file"),
    ("tar wrong type", _write(TAR, b"this is a text file, not a tar\n" * 40), TAR, "truncated or corrupt tar"),
    ("tar empty archive", _write(TAR, bytes(10240)), TAR, "holds no sample"),
    ("tar is a folder", _folder(TAR), TAR, "a folder, not a file"),
    ("tar dangling symlink", _dangling(TAR), TAR, "a dangling symbolic link"),
    ("tar bad shard name", lambda r: (r / TAR).rename(r / "train-1.tar"), "train-1.tar", "not a release shard name"),
    # tar members
    ("json truncated", _edit_first("json", lambda b: b[: len(b) // 2]), TAR, "does not decode"),
    ("json not an object", _edit_meta(lambda m: [m]), TAR, "does not decode"),
    ("json not UTF-8", _edit_first("json", lambda b: b"\xff\xfe" + b), TAR, "does not decode"),
    ("json missing field", _edit_meta(lambda m: _without(m, "tag")), TAR, "tag"),
    ("json wrong type", _edit_meta(lambda m: {**m, "width": "wide"}), TAR, "width"),
    ("json disagrees with key", _edit_meta(lambda m: {**m, "instance": m["instance"] + 7}), TAR, "json says"),
    ("txt not UTF-8", _edit_first("txt", lambda b: b"\xc3\x28" + b), TAR, "does not decode"),
    ("txt empty", _edit_first("txt", lambda b: b" \n"), TAR, "caption is empty"),
    ("source truncated", _edit_first("source.jpg", lambda b: b[:200]), TAR, "does not decode"),
    ("source wrong type", _edit_first("source.jpg", lambda b: b"GIF89a not really"), TAR, "does not decode"),
    ("mask wrong mode", _edit_first("mask.png", _mask_rgb), TAR, "mask mode is RGB, expected L"),
    ("mask not 0/255", _edit_first("mask.png", _mask_grey), TAR, "mask has values other than 0 and 255"),
    ("subject decompression bomb", _edit_first("subject.png", lambda b: bomb_png()), TAR, "does not decode"),
    ("member extra field", _rename_first(lambda n: n.replace(".txt", ".caption")), TAR, "not a format-v1 field"),
    ("member name with newline", _rename_first(lambda n: "a\nb" + n), TAR, "'a\\nb"),
    ("member name not UTF-8", _rename_first(lambda n: "\udcff" + n), TAR, "\\udcff"),
    # wids index
    ("index truncated", _write("train.index.json", lambda b: b[: len(b) // 2]), "train.index.json", "not valid JSON"),
    ("index not an object", _write("train.index.json", b"[1, 2]"), "train.index.json", "must be a JSON object, not an array"),
    ("index not UTF-8", _write("train.index.json", b'{"\xff": 1}'), "train.index.json", "not UTF-8"),
    ("index wrong kind", _json("train.index.json", lambda d: {**d, "__kind__": "x"}), "train.index.json", "__kind__"),
    ("index shardlist not a list", _json("train.index.json", lambda d: {**d, "shardlist": "train-000000.tar"}), "train.index.json", "shardlist"),
    ("index nsamples a string", _json("train.index.json", lambda d: _set(d, "shardlist.0.nsamples", "8")), "train.index.json", "shardlist.0.nsamples: Input should be a valid integer"),
    ("index nsamples negative", _json("train.index.json", lambda d: _set(d, "shardlist.0.nsamples", -1)), "train.index.json", "shardlist.0.nsamples"),
    ("index missing url", _json("train.index.json", lambda d: _set(d, "shardlist.0.url", "__del__")), "train.index.json", "shardlist.0.url: Field required"),
    ("index missing shardlist", _json("train.index.json", lambda d: _set(d, "shardlist", "__del__")), "train.index.json", "shardlist: Field required"),
    ("index extra field", _json("train.index.json", lambda d: {**d, "note": 1}), "train.index.json", "note: Extra inputs are not permitted"),
    ("index extra entry field", _json("train.index.json", lambda d: _set(d, "shardlist.0.md5", "x")), "train.index.json", "shardlist.0.md5: Extra inputs"),
    ("index wrong filesize", _json("train.index.json", lambda d: _set(d, "shardlist.0.filesize", 1)), "train.index.json", "size mismatch: train-000000.tar filesize is 1"),
    ("index lists a shard twice", _json("train.index.json", lambda d: {**d, "shardlist": d["shardlist"] + d["shardlist"][:1]}), "train.index.json", "a second time"),
    ("index is a folder", _folder("train.index.json"), "train.index.json", "a folder, not a file"),
    ("index dangling symlink", _dangling("val.index.json"), "val.index.json", "a dangling symbolic link"),
    ("index of a split with no shard", lambda r: [p.unlink() for p in r.glob("val-*.tar")], "val.index.json", "lists val-000000.tar, which is not in the release"),
    # manifest
    ("manifest not parquet", _write("manifest.parquet", b"key,split,shard\n"), "manifest.parquet", "not a readable parquet file"),
    ("manifest truncated", _write("manifest.parquet", lambda b: b[: len(b) // 2]), "manifest.parquet", "not a readable parquet file"),
    ("manifest null shard", _set_column("shard", lambda v: [None, *v[1:]]), "manifest.parquet", "column shard has 1 null(s) (first in row 0)"),
    ("manifest null score", _set_column("box_score", lambda v: [*v[:-1], None]), "manifest.parquet", "column box_score has 1 null(s)"),
    ("manifest wrong column type", _set_column("index_in_shard", lambda v: [str(x) for x in v], pa.string()), "manifest.parquet", "column index_in_shard is string, expected int32"),
    ("manifest missing column", _manifest(lambda t: t.drop_columns(["tag"])), "manifest.parquet", "column tag is missing"),
    ("manifest missing key column", _manifest(lambda t: t.drop_columns(["key"])), "manifest.parquet", "column key is missing"),
    ("manifest extra column", _manifest(lambda t: t.append_column("extra", pa.array([1] * len(t)))), "manifest.parquet", "column extra is not in the manifest schema"),
    ("manifest wrong position", _set_column("index_in_shard", lambda v: [v[0] + 1, *v[1:]]), "manifest.parquet", "row 0:"),
    ("manifest is a folder", _folder("manifest.parquet"), "manifest.parquet", "a folder, not a file"),
    # SHA256SUMS
    ("sums not UTF-8", _write("SHA256SUMS", lambda b: b + b"\xff\xfe  x\n", resum=False), "SHA256SUMS", "is not UTF-8"),
    ("sums malformed line", _write("SHA256SUMS", lambda b: b.replace(b"  ", b" ", 1), resum=False), "SHA256SUMS", "line 1 is not '<sha256"),
    ("sums upper-case digest", _write("SHA256SUMS", lambda b: b[:64].upper() + b[64:], resum=False), "SHA256SUMS", "line 1 is not"),
    ("sums truncated", _write("SHA256SUMS", lambda b: b[: len(b) // 2], resum=False), "SHA256SUMS", "is not '<sha256"),
    ("sums duplicate line", _write("SHA256SUMS", lambda b: b + b.split(b"\n")[0] + b"\n", resum=False), "SHA256SUMS", "a second time"),
    ("sums empty", _write("SHA256SUMS", b"", resum=False), "README.md", "not listed in SHA256SUMS"),
    ("sums is a folder", _folder("SHA256SUMS"), "SHA256SUMS", "a folder, not a file"),
    # release.json
    ("release.json truncated", _write("release.json", lambda b: b[: len(b) // 2]), "release.json", "not valid JSON"),
    ("release.json not an object", _write("release.json", b'"release"'), "release.json", "must be a JSON object, not a string"),
    ("release.json not UTF-8", _write("release.json", lambda b: b"\xff" + b), "release.json", "not UTF-8"),
    ("release.json wrong type", _json("release.json", lambda d: _set(d, "counts.samples.train", "24")), "release.json", "counts.samples.train: Input should be a valid integer"),
    ("release.json bool as count", _json("release.json", lambda d: _set(d, "params.seed", True)), "release.json", "params.seed"),
    ("release.json missing field", _json("release.json", lambda d: _set(d, "params.license", "__del__")), "release.json", "params.license: Field required"),
    ("release.json extra field", _json("release.json", lambda d: {**d, "built_at": "today"}), "release.json", "built_at: Extra inputs are not permitted"),
    ("release.json bad license", _json("release.json", lambda d: _set(d, "params.license", "GPL-9.9")), "release.json", "params.license: 'GPL-9.9' is not an SPDX license id"),
    ("release.json wrong count", _json("release.json", lambda d: _set(d, "counts.samples.val", 1000)), "release.json", "counts.samples.val is 1000, but the tars hold"),
    ("release.json is a folder", _folder("release.json"), "release.json", "a folder, not a file"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "file", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damage_is_a_one_line_finding(release_copy, damage, file: str, text: str, capsys) -> None:
    root = release_copy()
    damage(root)
    report = validate_release(root)
    assert not report.ok
    assert all("\n" not in e and "\r" not in e for e in report.errors), report.errors
    assert any(e.startswith(f"{file}: ") and text in e for e in report.errors), report.errors
    # The command line: exit 2 and the same findings, one per line, after the INVALID line.
    assert validate_main([str(root), "--workers", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"INVALID {root}: {len(report.errors)} problem(s)"
    assert err[1:] == [f"  - {e}" for e in report.errors][: len(err) - 1]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: {**m, "note": "mined on a rainy day"}, id="json extra field"),
        pytest.param(lambda m: m, id="json unchanged"),
    ],
)
def test_sample_json_may_carry_extra_keys(release_copy, change) -> None:
    # The sample json is open to new keys (`SampleMeta` allows extras: readers ignore what they do not know).
    root = release_copy()
    _edit_meta(change)(root)
    report = validate_release(root)
    assert report.ok, report.text()


def test_command_line_never_shows_a_traceback(release_copy) -> None:
    root = release_copy()
    (root / "train.index.json").write_text("[]")
    pq.write_table(pa.table({"key": [None]}), root / "manifest.parquet")
    (root / "SHA256SUMS").write_bytes(b"\xff\n")
    shutil.rmtree(root / "card")
    run = subprocess.run(
        [sys.executable, "-m", "dataengine.validate", str(root), "--workers", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "  - train.index.json: must be a JSON object, not an array" in run.stderr
    assert "  - SHA256SUMS: line 1 is not UTF-8 (byte 0: b'\\xff')" in run.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["--workers", "x"], "argument --workers: not an integer: 'x'"),
    ],
)
def test_bad_options_are_one_line(release_dir: Path, argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        validate_main([str(release_dir), *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"python -m dataengine.validate: error: {message}\n"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_missing_or_file_root_is_a_finding(tmp_path: Path, kind: str, capsys) -> None:
    root = tmp_path / "release"
    if kind == "file":
        root.write_text("not a folder")
    assert validate_main([str(root)]) == 2
    expected = "does not exist" if kind == "missing" else "not a folder"
    assert capsys.readouterr().err.splitlines() == [
        f"INVALID {root}: 1 problem(s)",
        f"  - {root}: {expected}",
    ]
