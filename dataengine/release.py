"""Pack mined quadruplet shards into a dataset release (`make shards`).

A release is what people download and train on. From one or more mined output folders (committed
shards only) it writes, into one folder:

- `{split}-{shard:06d}.tar`: WebDataset shards of a fixed sample count (or byte size), samples
  deduplicated by key, split train/val by source image, shuffled with a seed;
- `manifest.parquet`: one row per sample (key, split, shard, source, tag, caption, box, scores,
  mask area fraction, image sizes);
- `{split}.index.json`: a wids shard index per split;
- `release.json`: the parameters (license included, from `--license`) and counts of the release
  (machine-readable; its shape is `dataengine.release_format.ReleaseInfo`);
- `README.md` + `card/*.png`: the dataset card with plots (`dataengine.card`);
- `SHA256SUMS`: `sha256sum -c` lines over every other file.

The same inputs and parameters give a byte-identical release: inputs are read in a fixed order,
the shuffle is a seeded numpy Generator, tar headers carry fixed owner/mode/mtime, and nothing
written depends on the clock or on where the folders are. The release is built in a temporary
folder beside `--output`, checked with `dataengine.validate`, and renamed into place only if it
passes, so `--output` never holds a half-written or invalid release.

Reading is two passes: an index pass reads each input tar's headers plus the small `json`/`txt`
members and the image headers (to reject broken samples early and fill the manifest), then the
write pass copies member bytes straight from the input tars by offset; images are never
re-encoded. A damaged sample is left out with its reason and a damaged side file is reported;
neither stops the release.

Options and inputs are checked before anything is written: a bad one is a `ReleaseError` whose
one-line message names it, which the command line prints as `... error: ...` with exit status 2.

Usage:
    python -m dataengine.release --input mined/a mined/b --output release/v1 --seed 0 \
        --val-fraction 0.05 --samples-per-shard 1000 --license CC-BY-4.0
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from dataengine.release_format import (  # noqa: F401 - re-exported: the release's public names
    INDEX_KIND,
    MANIFEST,
    MANIFEST_SCHEMA,
    OTHER_LICENSE,
    RELEASE_FORMAT,
    RELEASE_JSON,
    SHARD_NAME,
    SPLITS,
    SUMS,
    index_name,
    normalize_license,
    shard_name,
    shown,
)
from dataengine.schema import (
    FIELDS,
    KEY_PATTERN,
    MASK,
    META,
    SCHEMA_VERSION,
    SOURCE,
    SUBJECT,
    TEXT,
    SampleMeta,
)

log = logging.getLogger(__name__)

CARD = "README.md"
STATS_SUFFIX = "_stats.json"
MINED_SHARD = re.compile(r"^\d{6}$")

# Fixed tar header fields: a release must not depend on who built it, when, or with which umask.
TAR_MTIME = 0
TAR_MODE = 0o644
TAR_FORMAT = tarfile.USTAR_FORMAT  # keys are short and ASCII, so no PAX headers are ever needed
TAR_BLOCK = 512
MIN_SHARD_BYTES = 4 * TAR_BLOCK  # one header and data block, and the two end-of-archive blocks


class ReleaseError(RuntimeError):
    """A release cannot be built; the message (one line) says which input or option is wrong."""


# --------------------------------------------------------------------------- reading mined folders


@dataclass(frozen=True)
class MemberRef:
    """Where one field's bytes sit inside an input tar."""

    field: str
    offset: int
    size: int


@dataclass(frozen=True)
class SampleRef:
    """One sample of the mined input: where its bytes are, and what the manifest needs to know."""

    key: str
    tar: str
    mined_shard: str
    members: tuple[MemberRef, ...]
    meta: SampleMeta
    caption: str
    subject_size: tuple[int, int]
    fingerprint: str  # sha256 of the json member: tells a true duplicate from a same-key conflict

    @property
    def nbytes(self) -> int:
        """The payload bytes of the five fields."""
        return sum(m.size for m in self.members)

    @property
    def tar_bytes(self) -> int:
        """The bytes this sample takes in a tar: a header block per member plus padded data."""
        return sum(TAR_BLOCK + -(-m.size // TAR_BLOCK) * TAR_BLOCK for m in self.members)


@dataclass
class Rejection:
    """A mined sample left out of the release: where, which, a short kind (for counting) and why."""

    mined_shard: str
    key: str
    kind: str
    reason: str


class SampleRejected(ValueError):
    """A mined sample that cannot go into a release; `kind` is a short class of the reason."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class InputScan:
    """Everything the index pass learned about the mined inputs."""

    inputs: list[str] = field(default_factory=list)
    samples: list[SampleRef] = field(default_factory=list)
    committed_shards: int = 0
    uncommitted: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    input_errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    conflicting_duplicates: list[str] = field(default_factory=list)
    ignored_members: int = 0
    image_status: Counter = field(default_factory=Counter)
    mining_stats: dict[str, float] = field(default_factory=dict)


def find_committed_shards(folder: Path) -> tuple[list[Path], list[Path]]:
    """The committed tars of a mined folder (their `_stats.json` exists), and the uncommitted ones.

    Args:
        folder: a mined output folder (`{shard:06d}.tar/.parquet/_stats.json`).

    Returns:
        (committed tars, uncommitted tars), each sorted by name.

    Raises:
        ReleaseError: the folder does not exist, is not a folder or cannot be listed, or a shard
            is marked complete but its tar is missing or not a readable file.
    """
    if not folder.exists():
        raise ReleaseError(f"--input {shown(str(folder))}: does not exist")
    if not folder.is_dir():
        raise ReleaseError(f"--input {shown(str(folder))}: is a file, not a mined folder")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise ReleaseError(
            f"--input {shown(str(folder))}: cannot be listed ({exc.strerror or exc})"
        ) from None
    committed, uncommitted = [], []
    for name in names:
        if not name.endswith(STATS_SUFFIX) or not MINED_SHARD.match(name[: -len(STATS_SUFFIX)]):
            continue
        tar = folder / f"{name[: -len(STATS_SUFFIX)]}.tar"
        if not tar.exists():
            raise ReleaseError(
                f"--input {shown(str(folder))}: {name} marks the shard complete but {tar.name} is missing"
            )
        if not tar.is_file():
            kind = "a folder" if tar.is_dir() else "not a regular file"
            raise ReleaseError(f"--input {shown(str(folder))}: {tar.name} is {kind}, not a tar file")
        if not os.access(tar, os.R_OK):
            raise ReleaseError(f"--input {shown(str(folder))}: {tar.name} is not readable (permissions)")
        committed.append(tar)
    done = {t.name for t in committed}
    for name in names:
        if name.endswith(".tar") and MINED_SHARD.match(name[:-4]) and name not in done:
            uncommitted.append(folder / name)
    return committed, uncommitted


HEADER_PREFIX = 1 << 14  # bytes read to find an image's header; the whole member if the header lies further


def _image_header(m: MemberRef, read: Any) -> Image.Image:
    """Open an image lazily from a prefix of its bytes: PIL parses the header (mode, size), not the pixels."""
    if m.size > HEADER_PREFIX:
        try:
            return Image.open(io.BytesIO(read(m, HEADER_PREFIX)))
        except (OSError, SyntaxError, ValueError):
            pass  # e.g. a JPEG whose EXIF/ICC segments push the frame header past the prefix
    return Image.open(io.BytesIO(read(m)))


def _check_sample(
    key: str, members: dict[str, MemberRef], read: Any
) -> tuple[SampleMeta, str, tuple[int, int]]:
    """Check one mined sample cheaply (metadata and image headers) and return what the manifest needs.

    The full pixel-level check (every image decodes, the mask is 0/255) is `dataengine.validate`,
    which runs over the finished release; here we only catch what makes a sample unusable or
    would make the release invalid, so that such samples are left out with a reason.

    Raises:
        SampleRejected: the reason the sample is rejected.
    """
    missing = [f for f in FIELDS if f not in members]
    if missing:
        raise SampleRejected("missing field", ", ".join(missing))
    if not KEY_PATTERN.match(key):
        raise SampleRejected("malformed key", f"{shown(key)} is not '{{source_id}}-{{instance:03d}}'")
    try:
        meta = SampleMeta.model_validate_json(read(members[META]))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SampleRejected(
            "bad json", f"{'.'.join(map(str, err['loc'])) or 'document'}: {shown(err['msg'])}"
        ) from None
    for name in ("box_score", "text_score", "mask_score", "box_xyxy"):
        value = getattr(meta, name)
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise SampleRejected("bad json", f"{name}: not a finite number")
    if f"{meta.source_id}-{meta.instance:03d}" != key:
        raise SampleRejected(
            "key differs from json", f"json says {shown(meta.source_id)}-{meta.instance:03d}"
        )
    try:
        caption = read(members[TEXT]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleRejected("caption not UTF-8", str(exc)) from None
    if not caption.strip():
        raise SampleRejected("empty caption")
    try:
        source = _image_header(members[SOURCE], read)
        mask = _image_header(members[MASK], read)
        subject = _image_header(members[SUBJECT], read)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleRejected("image does not open", shown(str(exc))) from None
    if source.mode != "RGB":
        raise SampleRejected("wrong source mode", f"{source.mode}, expected RGB")
    if source.size != (meta.width, meta.height):
        raise SampleRejected("source size differs from json", f"{source.size} vs {(meta.width, meta.height)}")
    if mask.mode != "L":
        raise SampleRejected("wrong mask mode", f"{mask.mode}, expected L")
    if mask.size != source.size:
        raise SampleRejected("mask size differs from source", f"{mask.size} vs {source.size}")
    if subject.mode != "RGBA":
        raise SampleRejected("wrong subject mode", f"{subject.mode}, expected RGBA")
    return meta, caption, subject.size


NOT_COUNTERS = {"format_version", "schema_version", "shard", "index"}


def _sum_numbers(node: Any, prefix: str, out: dict[str, float]) -> list[str]:
    """Add every numeric leaf of a nested stats mapping into `out` under its dotted key (counters, seconds).

    Returns:
        the dotted keys of leaves that are numbers but not finite (left out: `release.json` must
        stay standard JSON).
    """
    bad: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if not prefix and k in NOT_COUNTERS:
                continue
            bad += _sum_numbers(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        if not math.isfinite(node):
            return [prefix]
        out[prefix] = out.get(prefix, 0) + node
    return bad


def scan_inputs(inputs: Sequence[str | Path]) -> InputScan:
    """The index pass: find committed shards, read every sample's metadata, reject and dedupe.

    Inputs are read in the order given, shards by name, samples in tar order; when a key is seen
    again the first copy wins (so the release does not depend on anything but that order).

    Args:
        inputs: mined output folders.

    Returns:
        an `InputScan`: the kept samples and the counts of everything left out.

    Raises:
        ReleaseError: an input folder is missing, holds no committed shard, or is inconsistent.
    """
    scan = InputScan()
    seen: dict[str, SampleRef] = {}
    for folder in map(Path, inputs):
        committed, uncommitted = find_committed_shards(folder)
        if not committed:
            raise ReleaseError(
                f"--input {shown(str(folder))}: holds no committed shard (no {{shard:06d}}{STATS_SUFFIX}); "
                "is it a mined folder?"
            )
        scan.inputs.append(shown(folder.name))
        scan.committed_shards += len(committed)
        scan.uncommitted += [shown(f"{folder.name}/{t.name}") for t in uncommitted]
        for tar in committed:
            _read_shard_side_files(tar, scan)
            for ref in _scan_tar(tar, shown(f"{folder.name}/{tar.name}"), scan):
                first = seen.get(ref.key)
                if first is None:
                    seen[ref.key] = ref
                    scan.samples.append(ref)
                    continue
                scan.duplicates += 1
                if first.fingerprint != ref.fingerprint:
                    scan.conflicting_duplicates.append(
                        f"{ref.key}: {ref.mined_shard} differs from the kept copy in {first.mined_shard}"
                    )
    return scan


def _read_shard_side_files(tar: Path, scan: InputScan) -> None:
    """Sum the mining stats and per-image statuses of a committed shard into the scan (for the card)."""
    where = shown(tar.parent.name)
    stats_path = tar.with_name(f"{tar.stem}{STATS_SUFFIX}")
    try:
        stats = json.loads(stats_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        stats = None
        scan.input_errors.append(f"{where}/{stats_path.name}: unreadable stats ({shown(str(exc))})")
    if stats is not None and not isinstance(stats, dict):
        scan.input_errors.append(f"{where}/{stats_path.name}: not a JSON object")
    elif stats is not None:
        for key in _sum_numbers(stats, "", scan.mining_stats):
            scan.input_errors.append(f"{where}/{stats_path.name}: {shown(key)} is not a finite number")
    table = tar.with_suffix(".parquet")
    if table.is_symlink() or table.exists():
        if not table.is_file():
            scan.input_errors.append(f"{where}/{table.name}: not a regular file")
            return
        try:
            column = pq.read_table(table, columns=["status"]).column("status")
        except (OSError, KeyError, pa.ArrowException) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            scan.input_errors.append(f"{where}/{table.name}: unreadable ({shown(first)})")
            return
        if not pa.types.is_string(column.type):
            scan.input_errors.append(f"{where}/{table.name}: column status is {column.type}, expected string")
            return
        if column.null_count:
            scan.input_errors.append(f"{where}/{table.name}: column status has {column.null_count} null(s)")
        scan.image_status.update(s for s in column.to_pylist() if s is not None)


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal ASCII, or GNU base-256 when the high bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    return int(digits or b"0", 8)


def tar_members(fh: BinaryIO) -> Iterable[tuple[str, int, int]]:
    """Yield (name, data offset, size) of each regular file in a tar, reading only the headers.

    This is the index pass's hot loop. `tarfile` parses every header (and every PAX record) in
    Python at about 140 us per member, which made indexing as slow as copying the data; this
    reads the fixed header fields, honours PAX `path`/`size` records and GNU long names, checks
    each header's checksum, and seeks over the data. Anything else a tar can hold (links,
    devices, sparse files) is skipped like a directory.

    Raises:
        tarfile.ReadError: a header's checksum is wrong or unreadable, or the file ends inside a
            header or without an end-of-archive block.
    """
    pax: dict[str, str] = {}
    long_name: str | None = None
    offset = 0
    while True:
        fh.seek(offset)
        header = fh.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            if header.strip(b"\0"):
                raise tarfile.ReadError(f"the file ends inside a header at byte {offset}")
            if offset == 0:
                return  # an empty file: no member
            # Every tar writer ends with zero blocks; a file cut at a member boundary has none,
            # and its last sample may have lost fields.
            raise tarfile.ReadError(f"the file ends at byte {offset} without an end-of-archive block")
        if header == bytes(TAR_BLOCK):
            return  # end of archive
        try:
            stored = _tar_number(header[148:156])
        except ValueError:
            raise tarfile.ReadError(f"not a tar header at byte {offset}") from None
        if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise tarfile.ReadError(f"bad header checksum at byte {offset}")
        kind = header[156:157]
        try:
            size = _tar_number(header[124:136])
        except ValueError:
            raise tarfile.ReadError(f"bad size field in the header at byte {offset}") from None
        data = offset + TAR_BLOCK
        offset = data + -(-size // TAR_BLOCK) * TAR_BLOCK
        if kind in (b"x", b"L", b"g"):
            fh.seek(data)
            payload = fh.read(size)
            if kind == b"x":
                try:
                    pax = _pax_records(payload)
                except ValueError:
                    raise tarfile.ReadError(f"bad PAX header at byte {data - TAR_BLOCK}") from None
            elif kind == b"L":
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise tarfile.ReadError(f"bad PAX size {pax['size']!r} before byte {data}") from None
            offset = data + -(-size // TAR_BLOCK) * TAR_BLOCK
        name = pax.get("path") or long_name
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        pax, long_name = {}, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data, size


def _pax_records(payload: bytes) -> dict[str, str]:
    """The `key=value` records of a PAX extended header (`"%d %s=%s\n"`)."""
    records = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space == -1:
            break
        length = int(payload[pos:space])
        if length <= 0:
            break
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _scan_tar(tar: Path, where: str, scan: InputScan) -> Iterable[SampleRef]:
    """Yield the good samples of one input tar; record rejected samples and a corrupt tail."""
    try:
        fh = open(tar, "rb")  # noqa: SIM115 - closed by the with below; the open itself may fail
    except OSError as exc:
        raise ReleaseError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    with fh:

        def read(m: MemberRef, limit: int | None = None) -> bytes:
            fh.seek(m.offset)
            return fh.read(m.size if limit is None else min(limit, m.size))

        groups: list[tuple[str, dict[str, MemberRef]]] = []
        try:
            for name, offset, size in tar_members(fh):
                key, _, ext = os.path.basename(name).partition(".")
                if ext not in FIELDS:
                    scan.ignored_members += 1
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = MemberRef(ext, offset, size)
        except (tarfile.TarError, OSError) as exc:
            # A committed shard should never be truncated; keep what precedes the damage, say so.
            scan.input_errors.append(
                f"{where}: corrupt or truncated tar after {len(groups)} sample(s): {shown(str(exc))}"
            )
            if groups:
                dropped = groups.pop()  # the last sample may be cut short
                scan.rejected.append(
                    Rejection(where, shown(dropped[0]), "corrupt tar", "cut short by the corrupt tar")
                )
        file_size = os.fstat(fh.fileno()).st_size
        for key, members in groups:
            try:
                past_end = [m.field for m in members.values() if m.offset + m.size > file_size]
                if past_end:  # a tar cut short at a header boundary reads "cleanly" up to here
                    raise SampleRejected(
                        "corrupt tar", f"{', '.join(past_end)} run(s) past the end of the file"
                    )
                meta, caption, subject_size = _check_sample(key, members, read)
            except SampleRejected as exc:
                scan.rejected.append(Rejection(where, shown(key), exc.kind, str(exc)))
                continue
            ordered = tuple(members[f] for f in FIELDS)
            yield SampleRef(
                key=key,
                tar=str(tar),
                mined_shard=where,
                members=ordered,
                meta=meta,
                caption=caption,
                subject_size=subject_size,
                fingerprint=hashlib.sha256(read(members[META])).hexdigest(),
            )


# --------------------------------------------------------------------------- split, shuffle, shard


def split_of(source_id: str, seed: int, val_fraction: float) -> str:
    """The split of a source image: a seeded hash of its source_id against the val fraction.

    Hashing (rather than drawing from the list of sources) keeps every source in its split when
    the release is rebuilt with more data: a source never moves from train to val.
    """
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{source_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def plan_release(
    samples: Sequence[SampleRef],
    seed: int,
    val_fraction: float,
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
) -> dict[str, list[list[SampleRef]]]:
    """Split by source, shuffle each split with the seed, and cut it into shards.

    Args:
        samples: deduplicated samples (any order: they are sorted by key first).
        seed: the shuffle and split seed.
        val_fraction: the expected fraction of source images in val, in [0, 1).
        samples_per_shard: samples per shard (the last shard of a split holds the remainder).
        shard_bytes: instead, the most tar bytes per shard (a shard holds at least one sample).

    Returns:
        split -> list of shards, each a list of samples in write order; splits with no sample are left out.
    """
    by_split: dict[str, list[SampleRef]] = {s: [] for s in SPLITS}
    for ref in sorted(samples, key=lambda r: r.key):
        by_split[split_of(ref.meta.source_id, seed, val_fraction)].append(ref)
    plan: dict[str, list[list[SampleRef]]] = {}
    for i, split in enumerate(SPLITS):
        refs = by_split[split]
        if not refs:
            continue
        order = np.random.default_rng([seed, i]).permutation(len(refs))
        shuffled = [refs[j] for j in order]
        plan[split] = _cut(shuffled, samples_per_shard, shard_bytes)
    return plan


def _cut(
    refs: list[SampleRef], samples_per_shard: int | None, shard_bytes: int | None
) -> list[list[SampleRef]]:
    if samples_per_shard is not None:
        return [refs[i : i + samples_per_shard] for i in range(0, len(refs), samples_per_shard)]
    assert shard_bytes is not None
    shards: list[list[SampleRef]] = [[]]
    size = 2 * TAR_BLOCK  # the end-of-archive blocks
    for ref in refs:
        if shards[-1] and size + ref.tar_bytes > shard_bytes:
            shards.append([])
            size = 2 * TAR_BLOCK
        shards[-1].append(ref)
        size += ref.tar_bytes
    return shards


# --------------------------------------------------------------------------- writing


class HashingWriter:
    """A write-only file wrapper that hashes (SHA-256) and counts what passes through it."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.nbytes


class InputFiles:
    """A few open input tars, least recently used closed first (a release may read thousands)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self.open: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        fh = self.open.pop(path, None)
        if fh is None:
            if len(self.open) >= self.max_open:
                self.open.popitem(last=False)[1].close()
            fh = open(path, "rb")  # noqa: SIM115 - kept open across calls, closed by close()
        self.open[path] = fh
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise ReleaseError(
                f"{path}: short read at offset {offset} (the input changed during the release?)"
            )
        return data

    def close(self) -> None:
        for fh in self.open.values():
            fh.close()
        self.open.clear()


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed owner, mode and mtime, so the same bytes give the same tar."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(path: Path, refs: Sequence[SampleRef], files: InputFiles) -> str:
    """Write one release shard (fields in schema order per sample); return its SHA-256 hex digest."""
    # The tar is written block by block (header, data, zero padding) rather than through
    # TarFile.addfile: the same bytes as tarfile writes, at a fraction of the per-member cost,
    # hashed on the way so SHA256SUMS needs no second read.
    with open(path, "wb", buffering=1 << 20) as fh:
        out = HashingWriter(fh)
        for ref in refs:
            for m in ref.members:
                data = files.read(ref.tar, m.offset, m.size)
                out.write(tar_info(f"{ref.key}.{m.field}", m.size).tobuf(TAR_FORMAT, "utf-8", "strict"))
                out.write(data)
                if m.size % TAR_BLOCK:
                    out.write(bytes(TAR_BLOCK - m.size % TAR_BLOCK))
        out.write(bytes(2 * TAR_BLOCK))  # end of archive, then pad to a whole record, as tarfile does
        if out.nbytes % tarfile.RECORDSIZE:
            out.write(bytes(tarfile.RECORDSIZE - out.nbytes % tarfile.RECORDSIZE))
    return out.sha.hexdigest()


def manifest_table(plan: dict[str, list[list[SampleRef]]]) -> pa.Table:
    """The manifest: one row per sample, in release order (split, shard, position)."""
    rows: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for split, shards in plan.items():
        for i, refs in enumerate(shards):
            for pos, ref in enumerate(refs):
                m = ref.meta
                values = {
                    "key": ref.key,
                    "split": split,
                    "shard": shard_name(split, i),
                    "index_in_shard": pos,
                    "source_id": m.source_id,
                    "instance": m.instance,
                    "tag": m.tag,
                    "caption": ref.caption,
                    "box_xyxy": [float(v) for v in m.box_xyxy],
                    "box_score": m.box_score,
                    "text_score": m.text_score,
                    "mask_score": m.mask_score,
                    "mask_area_frac": m.mask_area_frac,
                    "width": m.width,
                    "height": m.height,
                    "subject_width": ref.subject_size[0],
                    "subject_height": ref.subject_size[1],
                    "nbytes": ref.nbytes,
                    "uri": m.uri,
                    "pipeline": m.pipeline,
                    "config_hash": m.config_hash,
                    "mined_shard": ref.mined_shard,
                }
                for k, v in values.items():
                    rows[k].append(v)
    return pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a parquet file with fixed settings (no statistics-dependent or clock-dependent bytes)."""
    pq.write_table(
        table, path, compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True
    )


def write_json(obj: Any, path: Path) -> None:
    """Write JSON with sorted keys and a trailing newline (stable bytes)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            sha.update(block)
    return sha.hexdigest()


# --------------------------------------------------------------------------- the release


@dataclass
class ReleaseSummary:
    """What a release wrote, for the CLI and the benchmark."""

    output: Path
    counts: dict[str, int]
    shards: dict[str, int]
    seconds: dict[str, float]
    rejected: int
    duplicates: int


def check_options(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    seed: int,
    val_fraction: float,
    samples_per_shard: int | None,
    shard_bytes: int | None,
    overwrite: bool,
    license: str,
) -> tuple[Path, str]:
    """Check a release's options and its output folder before anything is read or written.

    Returns:
        (the output folder as an absolute path, the canonical license).

    Raises:
        ReleaseError: one line naming the option and what is wrong with it.
    """
    if (samples_per_shard is None) == (shard_bytes is None):
        raise ReleaseError("give exactly one of --samples-per-shard and --shard-bytes")
    if samples_per_shard is not None and (isinstance(samples_per_shard, bool) or samples_per_shard < 1):
        raise ReleaseError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < MIN_SHARD_BYTES:
        raise ReleaseError(f"--shard-bytes must be >= {MIN_SHARD_BYTES}, got {shard_bytes}")
    if not (isinstance(val_fraction, int | float) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise ReleaseError(f"--val-fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReleaseError(f"--seed must be an integer >= 0, got {seed!r}")
    try:
        license = normalize_license(license)
    except ValueError as exc:
        raise ReleaseError(f"--license: {exc}") from None
    if not inputs:
        raise ReleaseError("give at least one --input folder")
    given = str(output)
    output = Path(os.path.abspath(output))
    for folder in inputs:
        folder = Path(os.path.abspath(folder))
        if output == folder or output.is_relative_to(folder):
            raise ReleaseError(
                f"--output {shown(given)}: is inside --input {shown(str(folder))}; write the release elsewhere"
            )
        if folder.is_relative_to(output):
            raise ReleaseError(
                f"--input {shown(str(folder))}: is inside --output {shown(given)}; write the release elsewhere"
            )
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise ReleaseError(f"--output {shown(given)}: exists and is not a folder; give a new folder name")
        if not overwrite:
            raise ReleaseError(f"--output {shown(given)}: exists; pass --overwrite to replace it")
        if not (output / RELEASE_JSON).is_file() and any(output.iterdir()):
            raise ReleaseError(
                f"--output {shown(given)}: exists and is not a release (no {RELEASE_JSON}); "
                "refusing to replace it, even with --overwrite"
            )
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ReleaseError(f"--output {shown(given)}: {shown(str(ancestor))} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ReleaseError(
            f"--output {shown(given)}: cannot write in {shown(str(ancestor))} (permission denied)"
        )
    return output, license


def build_release(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    samples_per_shard: int | None = 1000,
    shard_bytes: int | None = None,
    overwrite: bool = False,
    validate: bool = True,
    card: bool = True,
    workers: int = 1,
    progress: bool = False,
    license: str = OTHER_LICENSE,
) -> ReleaseSummary:
    """Build a release from mined folders into `output` (see the module docstring).

    Args:
        inputs: mined output folders, read in this order (first copy of a key wins).
        output: the release folder; must not exist unless `overwrite`.
        seed: the split and shuffle seed.
        val_fraction: expected fraction of source images in val, in [0, 1).
        samples_per_shard: samples per shard; give this or `shard_bytes`, not both.
        shard_bytes: the most bytes per shard.
        overwrite: replace an existing `output` (only after the new release validated).
        validate: run `dataengine.validate` on the new release before publishing it.
        card: write the dataset card and its plots.
        workers: processes for validation.
        progress: show tqdm progress bars.
        license: the release's license, an SPDX id (`CC-BY-4.0`) or `other` (none declared):
            written to `release.json` (`params.license`) and the card's front matter.

    Returns:
        a `ReleaseSummary`.

    Raises:
        ReleaseError: a bad option or input, no sample left, or the new release failed validation
            (it is then left in a `.failed` folder beside `output` for inspection; the exception's
            `report` attribute holds the `ValidationReport`).
        OSError: writing failed (e.g. the disk is full); nothing is left behind but `output` as it was.
    """
    output, license = check_options(
        inputs,
        output,
        seed=seed,
        val_fraction=val_fraction,
        samples_per_shard=samples_per_shard,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        license=license,
    )
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    scan = scan_inputs(inputs)
    if not scan.samples:
        raise ReleaseError(
            f"no usable sample in {', '.join(map(str, inputs))} ({len(scan.rejected)} rejected)"
        )
    plan = plan_release(scan.samples, seed, val_fraction, samples_per_shard, shard_bytes)
    seconds["index"] = time.perf_counter() - t0
    if val_fraction > 0 and "val" not in plan:
        # The split hashes each source; with very few sources none may fall below the fraction.
        log.warning(
            "val is empty: none of the %d source images hashed into val at fraction %s",
            len({r.meta.source_id for r in scan.samples}),
            val_fraction,
        )
    for problem in scan.input_errors:
        log.warning("input problem: %s", problem)
    if scan.rejected:
        log.warning("%d sample(s) rejected (reasons in release.json)", len(scan.rejected))

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReleaseError(
            f"--output {shown(str(output))}: cannot create its parent ({exc.strerror or exc})"
        ) from None
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous killed release of this same output
    tmp.mkdir()
    try:
        summary = _write_release(
            scan, plan, tmp, output, seconds, seed, val_fraction, samples_per_shard, shard_bytes,
            overwrite, validate, card, workers, progress, license,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written release behind
        raise
    return summary


def _write_release(
    scan: InputScan,
    plan: dict[str, list[list[SampleRef]]],
    tmp: Path,
    output: Path,
    seconds: dict[str, float],
    seed: int,
    val_fraction: float,
    samples_per_shard: int | None,
    shard_bytes: int | None,
    overwrite: bool,
    validate: bool,
    card: bool,
    workers: int,
    progress: bool,
    license: str,
) -> ReleaseSummary:
    """Write the planned release into `tmp`, validate it, and move it to `output` (build_release's second half)."""

    t0 = time.perf_counter()
    sums: dict[str, str] = {}
    files = InputFiles()
    try:
        jobs = [(split, i, refs) for split, shards in plan.items() for i, refs in enumerate(shards)]
        if progress:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="shards", unit="shard")
        for split, i, refs in jobs:
            name = shard_name(split, i)
            sums[name] = write_shard(tmp / name, refs, files)
    finally:
        files.close()
    seconds["write"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = manifest_table(plan)
    write_parquet(table, tmp / MANIFEST)
    for split, shards in plan.items():
        index = {
            "__kind__": INDEX_KIND,
            "wids_version": 1,
            "shardlist": [
                {
                    "url": shard_name(split, i),
                    "nsamples": len(refs),
                    "filesize": (tmp / shard_name(split, i)).stat().st_size,
                }
                for i, refs in enumerate(shards)
            ],
        }
        write_json(index, tmp / index_name(split))
    info = release_info(
        scan,
        plan,
        seed=seed,
        val_fraction=val_fraction,
        samples_per_shard=samples_per_shard,
        shard_bytes=shard_bytes,
        license=license,
    )
    write_json(info, tmp / RELEASE_JSON)
    seconds["manifest"] = time.perf_counter() - t0

    if card:
        t0 = time.perf_counter()
        from dataengine.card import write_card

        write_card(tmp, info, table)
        seconds["card"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_sums(tmp, known=sums)
    seconds["checksums"] = time.perf_counter() - t0

    if validate:
        t0 = time.perf_counter()
        from dataengine.validate import validate_release

        report = validate_release(tmp, workers=workers)
        seconds["validate"] = time.perf_counter() - t0
        if not report.ok:
            failed = output.with_name(f"{output.name}.failed")
            if failed.exists():
                shutil.rmtree(failed)
            tmp.rename(failed)
            report.root = failed
            error = ReleaseError(
                f"the new release does not validate ({len(report.errors)} problem(s), first: "
                f"{report.errors[0]}); it is left at {failed} for inspection "
                f"(python -m dataengine.validate {failed})"
            )
            error.report = report  # type: ignore[attr-defined]
            raise error

    if output.exists():
        old = output.with_name(f".{output.name}.old")
        if old.exists():
            shutil.rmtree(old)
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)
    return ReleaseSummary(
        output=output,
        counts=info["counts"]["samples"],
        shards={s: len(v) for s, v in plan.items()},
        seconds=seconds,
        rejected=len(scan.rejected),
        duplicates=scan.duplicates,
    )


def write_sums(root: Path, known: dict[str, str] | None = None) -> None:
    """Write `SHA256SUMS` (`sha256sum -c` format, sorted) over every file under `root` but itself.

    Args:
        root: the release folder.
        known: digests already computed while writing (relative path -> hex), reused as is.
    """
    known = known or {}
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == SUMS:
            continue
        lines.append(f"{known.get(rel) or sha256_file(path)}  {rel}\n")
    (root / SUMS).write_text("".join(lines), encoding="utf-8")


def release_info(
    scan: InputScan,
    plan: dict[str, list[list[SampleRef]]],
    *,
    seed: int,
    val_fraction: float,
    samples_per_shard: int | None,
    shard_bytes: int | None,
    license: str = OTHER_LICENSE,
) -> dict[str, Any]:
    """The machine-readable description of a release (`release.json`), also the card's data.

    Its shape is `dataengine.release_format.ReleaseInfo`, which `dataengine.validate` checks.
    """
    kept = [ref for shards in plan.values() for refs in shards for ref in refs]
    provenance: Counter = Counter()
    for ref in kept:
        m = ref.meta
        provenance[
            json.dumps(
                {"pipeline": m.pipeline, "config_hash": m.config_hash, "models": m.models}, sort_keys=True
            )
        ] += 1
    reasons = Counter(r.kind for r in scan.rejected)
    return {
        "release_format": RELEASE_FORMAT,
        "sample_schema_version": SCHEMA_VERSION,
        "fields": list(FIELDS),
        "params": {
            "inputs": scan.inputs,
            "seed": seed,
            "val_fraction": val_fraction,
            "samples_per_shard": samples_per_shard,
            "shard_bytes": shard_bytes,
            "license": license,
        },
        "counts": {
            "samples": {s: sum(len(r) for r in shards) for s, shards in plan.items()},
            "sources": {
                s: len({r.meta.source_id for refs in shards for r in refs}) for s, shards in plan.items()
            },
            "shards": {s: len(shards) for s, shards in plan.items()},
            "bytes": {s: sum(r.nbytes for refs in shards for r in refs) for s, shards in plan.items()},
        },
        "inputs": {
            "committed_shards": scan.committed_shards,
            "uncommitted_shards_skipped": scan.uncommitted,
            "samples_read": len(scan.samples) + scan.duplicates,
            "duplicates_dropped": scan.duplicates,
            "conflicting_duplicates": scan.conflicting_duplicates,
            "rejected": len(scan.rejected),
            "rejected_by_reason": dict(sorted(reasons.items())),
            "rejected_samples": [f"{r.mined_shard}: {r.key}: {r.reason}" for r in scan.rejected],
            "ignored_members": scan.ignored_members,
            "input_errors": scan.input_errors,
            "image_status": dict(sorted(scan.image_status.items())),
            "mining_stats": dict(sorted(scan.mining_stats.items())),
        },
        "provenance": [
            {**json.loads(k), "samples": n}
            for k, n in sorted(provenance.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m dataengine.release` command line; returns the exit status.

    0: written; 2: a bad option or input, or the new release did not validate (one `error:`
    line on stderr, naming the option or file); 1: writing failed (e.g. disk full).
    """
    from dataengine.release_cli import (
        OneLineErrorParser,
        byte_size,
        fail,
        fraction,
        non_negative_int,
        positive_int,
    )

    prog = "python -m dataengine.release"
    parser = OneLineErrorParser(
        prog=prog,
        description="Pack mined quadruplet shards into a dataset release: dedupe, split by source, "
        "shuffle, reshard, manifest, wids index, checksums, dataset card, validation.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="DIR",
        help="mined output folder(s); first copy of a key wins",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="the release folder (must not exist unless --overwrite)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="split and shuffle seed (default 0)")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.05,
        help="expected fraction of source images in val, in [0, 1) (default 0.05)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=positive_int, help="samples per shard (default 1000)")
    size.add_argument(
        "--shard-bytes",
        type=lambda text: byte_size(text, minimum=MIN_SHARD_BYTES),
        help=f"most bytes per shard instead, e.g. 512MB (at least {MIN_SHARD_BYTES})",
    )
    parser.add_argument(
        "--license",
        default=OTHER_LICENSE,
        metavar="SPDX",
        help="the release's license: an SPDX id such as CC-BY-4.0, or 'other' (default: other, "
        "no license declared); written to release.json and the dataset card",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing release (after the new one validated)"
    )
    parser.add_argument(
        "--no-validate", action="store_true", help="skip the final `dataengine.validate` pass"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="processes for validation"
    )
    args = parser.parse_args(argv)
    try:
        args.license = normalize_license(args.license)
    except ValueError as exc:
        parser.error(f"argument --license: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = build_release(
            args.input,
            args.output,
            seed=args.seed,
            val_fraction=args.val_fraction,
            samples_per_shard=None if args.shard_bytes is not None else (args.samples_per_shard or 1000),
            shard_bytes=args.shard_bytes,
            overwrite=args.overwrite,
            validate=not args.no_validate,
            workers=args.workers,
            progress=sys.stderr.isatty(),
            license=args.license,
        )
    except ReleaseError as exc:
        return fail(prog, str(exc))
    except OSError as exc:
        fail(prog, f"writing the release failed, nothing was published: {exc}")
        return 1
    counts = ", ".join(f"{s} {n} samples in {summary.shards[s]} shards" for s, n in summary.counts.items())
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items())
    print(
        f"release written to {args.output}: {counts}; {summary.duplicates} duplicates dropped, "
        f"{summary.rejected} rejected ({timing})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
