"""Input discovery and deterministic input shards for the data engine.

A pipeline names one or more inputs (`InputSpec`): a folder of images (local or any fsspec URL,
searched recursively), WebDataset tars (img2dataset output: an image field plus optional json/txt),
or a parquet/CSV table with a column of image paths or URIs. `plan_shards` lists every image as an
`InputItem` in a stable order and cuts the list into `InputShard`s of `images_per_shard`, so the
same inputs always give the same shards and therefore the same output shard names, which is what
makes resume exact. `read_bytes` fetches one item's bytes (a byte range for a tar member).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from braceexpand import braceexpand

from dataengine.config import InputSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# WebDataset image fields tried in order when `image_field` is not set.
WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


class InputError(ValueError):
    """An input named in the pipeline cannot be listed (missing path, no images, bad column)."""


@dataclass(frozen=True)
class InputItem:
    """One input image: where its bytes live.

    `uri` is what the user sees in the parquet row and the sample metadata; `path` is the fsspec
    URL read; for a tar member, `offset`/`length` is the member's byte range inside `path`.
    """

    uri: str
    path: str
    offset: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class InputShard:
    """A deterministic slice of the inputs; output shard `{index:06d}` is made from exactly this."""

    index: int
    items: tuple[InputItem, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """The output shard name, `{index:06d}`."""
        return f"{self.index:06d}"

    def fingerprint(self) -> str:
        """A hash of the shard's item list: a resumed run checks its committed shards against it."""
        blob = "\n".join(f"{it.uri}\t{it.offset}\t{it.length}" for it in self.items).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def plan_shards(specs: Iterable[InputSpec]) -> list[InputShard]:
    """List every input image and cut the list into shards, in a stable order.

    Inputs are taken in the order the pipeline lists them; within an input, files are sorted by
    path, tar members keep their order in the tar, table rows keep their row order. Each input is
    cut on its own (`images_per_shard`), so adding a second input does not rename the first one's
    shards.

    Returns:
        The shards, numbered from 0.

    Raises:
        InputError: an input path does not exist, holds no image, or lacks the image column/field.
    """
    shards: list[InputShard] = []
    for spec in specs:
        try:
            items = list(list_items(spec))
        except OSError as exc:  # e.g. a folder or tar that cannot be read (permissions, network)
            raise InputError(f"input {spec.path!r} ({spec.kind}) cannot be read: {exc.strerror or exc}") from exc
        if not items:
            raise InputError(f"input {spec.path!r} ({spec.kind}) holds no image")
        size = spec.images_per_shard
        for start in range(0, len(items), size):
            shards.append(InputShard(index=len(shards), items=tuple(items[start : start + size])))
    return shards


def list_items(spec: InputSpec) -> Iterator[InputItem]:
    """The images of one input, in a stable order.

    Raises:
        InputError: the input cannot be listed.
    """
    if spec.kind == "images":
        yield from _list_folder(spec.path)
    elif spec.kind == "webdataset":
        yield from _list_webdataset(spec.path, spec.image_field)
    else:
        yield from _list_table(spec.path, spec.image_column)


def read_bytes(item: InputItem) -> bytes:
    """Read an item's bytes (the whole file, or the tar member's byte range).

    Raises:
        OSError: the file cannot be read (missing, permission, network); the engine records it.
    """
    fs, path = fsspec.core.url_to_fs(item.path)
    if item.offset is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=item.offset, end=item.offset + (item.length or 0))


# --------------------------------------------------------------------------- listing


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by `fs` turned back into a URL that `url_to_fs` opens."""
    return fs.unstrip_protocol(path) if _protocol(fs) != "file" else path


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, tuple | list) else proto


def _list_folder(root: str) -> Iterator[InputItem]:
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise InputError(f"input folder {root!r} does not exist")
    if not fs.isdir(path):
        raise InputError(f"input {root!r} is not a folder (kind: images expects a folder of images)")
    found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS))
    for p in found:
        url = _url(fs, p)
        yield InputItem(uri=url, path=url)


def _expand_tars(pattern: str) -> list[str]:
    urls: list[str] = []
    for expanded in braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(expanded)
        if fs.isdir(path):
            matches = sorted(p for p in fs.find(path) if p.endswith(".tar"))
        elif any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.exists(path):
            matches = [path]
        else:
            raise InputError(f"webdataset input {expanded!r} does not exist")
        urls.extend(_url(fs, p) for p in matches)
    if not urls:
        raise InputError(f"webdataset input {pattern!r} matches no tar file")
    return urls


def _list_webdataset(pattern: str, image_field: str | None) -> Iterator[InputItem]:
    fields = (image_field.lower().lstrip("."),) if image_field else WDS_IMAGE_FIELDS
    for url in _expand_tars(pattern):
        # Group members by WebDataset key (basename up to the first dot) in tar order.
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with fsspec.open(url, "rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        dirname, base = posixpath.split(member.name)
                        stem, dot, ext = base.partition(".")
                        if not dot or base.startswith("_"):
                            continue
                        key = posixpath.join(dirname, stem)
                        samples.setdefault(key, {})[ext.lower()] = member
            except tarfile.TarError as exc:
                raise InputError(f"webdataset input {url!r} is not a readable tar: {exc}") from exc
        for members in samples.values():
            member = next((members[f] for f in fields if f in members), None)
            if member is None:
                continue  # e.g. an img2dataset sample that failed to download has only json/txt
            yield InputItem(uri=f"{url}#{member.name}", path=url, offset=member.offset_data, length=member.size)


def _list_table(table: str, column: str) -> Iterator[InputItem]:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(table)
    if not fs.isfile(path):
        raise InputError(f"table input {table!r} does not exist")
    lower = path.lower()
    with fs.open(path, "rb") as f:
        try:
            if lower.endswith(".parquet"):
                data = pq.read_table(f)
            elif lower.endswith((".csv", ".tsv")):
                opts = pa_csv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
                data = pa_csv.read_csv(f, parse_options=opts)
            else:
                raise InputError(f"table input {table!r}: expected a .parquet, .csv or .tsv file")
        except pa.ArrowException as exc:
            reason = " ".join(str(exc).split())
            raise InputError(f"table input {table!r} is not a readable table: {reason}") from exc
    if column not in data.column_names:
        raise InputError(
            f"table input {table!r} has no column {column!r} (set image_column); columns: {', '.join(data.column_names)}"
        )
    base = _url(fs, posixpath.dirname(path))
    for value in data.column(column).to_pylist():
        if value is None or not str(value).strip():
            continue
        ref = str(value).strip()
        # Relative paths in a table are relative to the table's folder.
        url = ref if "://" in ref or ref.startswith("/") else posixpath.join(base, ref)
        yield InputItem(uri=ref, path=url)


# --------------------------------------------------------------------------- sample images

# scikit-image ships these photos inside the wheel (no download): the `sample` pipeline's inputs.
SAMPLE_IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png")


def write_sample_images(dest: str | os.PathLike) -> list[Path]:
    """Copy the bundled sample photos into `dest` (byte for byte, so their source ids never change).

    Idempotent: a file already there with the same bytes is left alone; each copy is written to a
    temporary name and renamed.

    Returns:
        The paths of the sample images.

    Raises:
        FileNotFoundError: scikit-image's data folder lacks one of the photos.
    """
    import skimage.data

    src_dir = Path(skimage.data.__file__).resolve().parent
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLE_IMAGES:
        data = (src_dir / name).read_bytes()
        target = dest / name
        if not (target.is_file() and target.read_bytes() == data):
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m dataengine.inputs sample-images DEST`: copy the sample photos, print their paths.

    A DEST that is a file or cannot be created or written ends in one `error:` line, status 2.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m dataengine.inputs", description="Input helpers of the data engine."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sample = commands.add_parser(
        "sample-images", help="copy the `sample` pipeline's photos (bundled with scikit-image)"
    )
    sample.add_argument("dest", metavar="DEST", help="folder to copy them into (created)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if not args.dest.strip():
        parser.error("argument DEST: must not be empty")
    if dest.exists() and not dest.is_dir():
        print(f"error: DEST {args.dest!r} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        print(f"error: DEST {args.dest!r}: a part of the path is a file, not a folder", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: DEST {args.dest!r}: cannot create the folder: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        paths = write_sample_images(dest)
    except OSError as exc:
        if exc.filename and not str(exc.filename).startswith(str(dest)):
            print(
                f"error: the bundled sample photo {exc.filename!r} cannot be read: {exc.strerror}", file=sys.stderr
            )
            return 1
        print(f"error: DEST {args.dest!r}: cannot write there: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
