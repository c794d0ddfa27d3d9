"""Check a dataset release (`python -m dataengine.validate DIR`), also run at the end of every release.

Checks, each failure one line naming the file (and the sample, field or row):

- every `*.tar` is a readable regular file (not a folder, not a dangling link) with a release
  shard name, and reads to its end (a truncated or corrupt tar is named);
- every sample has the five fields of format v1, decodes, and keeps the contract
  (`dataengine.schema.decode_sample`: source RGB, mask L 0/255 of the source size, subject RGBA,
  non-empty UTF-8 caption, valid json), and its json agrees with its key and its source size;
- keys are unique across the whole release, and no source image is in two splits;
- each split's wids index is a wids shard index (exact keys and types) listing exactly the
  split's tars with their true sample counts and file sizes;
- `manifest.parquet` is parquet with the manifest's columns and types, no nulls, and one row per
  sample, in the right split, shard and position;
- `release.json` has the release's keys and types, a valid license, and counts that match the tars;
- `SHA256SUMS` is UTF-8 `<sha256>  <path>` lines, lists every file once, and every digest matches.

The readers never trust a file's shape (`dataengine.release_format`): a damaged file is a
finding, never a crash. Exits 0 with a one-line summary, or 2 with one line per problem.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from dataengine.release_format import (
    MANIFEST,
    RELEASE_JSON,
    SHARD_NAME,
    SPLITS,
    SUMS,
    ReleaseInfo,
    WidsIndex,
    index_name,
    normalize_license,
    read_json_model,
    read_manifest,
    read_sums,
    shown,
)
from dataengine.schema import FIELDS, decode_sample

MAX_SHOWN = 200  # a report longer than this is cut, with the count of what is left out
EXIT_INVALID = 2


def not_a_file(path: Path) -> str | None:
    """Why an existing name is not a regular file we can read (a folder, a dangling link), or None."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "a dangling symbolic link"
    if path.is_dir():
        return "a folder, not a file"
    return "not a regular file"


def file_problem(path: Path) -> str | None:
    """Why a file the release must hold cannot be read as one ("missing", or `not_a_file`'s reason), or None."""
    if not path.exists() and not path.is_symlink():
        return "missing"
    return not_a_file(path)


@dataclass
class ValidationReport:
    """The result of validating a release: every problem found, and what was counted."""

    root: Path
    errors: list[str] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.errors

    def text(self) -> str:
        """The human-readable report."""
        if self.ok:
            counts = ", ".join(f"{s} {n} samples in {self.shards[s]} shards" for s, n in self.samples.items())
            return f"OK {self.root}: {counts}"
        shown_errors = self.errors[:MAX_SHOWN]
        more = len(self.errors) - len(shown_errors)
        lines = [f"INVALID {self.root}: {len(self.errors)} problem(s)"] + [f"  - {e}" for e in shown_errors]
        if more:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)


@dataclass
class TarCheck:
    """What one tar holds: its (key, source_id) pairs in order, its SHA-256, and its problems."""

    name: str
    keys: list[tuple[str, str]] = field(default_factory=list)
    sha256: str = ""
    errors: list[str] = field(default_factory=list)


class HashingReader:
    """A sequential read-only file wrapper that hashes what it reads (one pass: decode and checksum)."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        """Read to the end of the file (tar padding after the archive end) and return the digest."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def check_tar(path: str | Path) -> TarCheck:
    """Read a release tar in one sequential pass: decode and check every sample, hash the bytes.

    Args:
        path: a release shard.

    Returns:
        a `TarCheck`; problems are in its `errors`, each naming the tar and the sample.
    """
    path = Path(path)
    result = TarCheck(path.name)
    current: dict[str, bytes] = {}
    current_key: list[str] = []  # the key the fields in `current` belong to (empty: none yet)
    seen: set[str] = set()

    def finish() -> None:
        if not current_key:
            return
        key = current_key.pop()
        raw = {"__key__": shown(key), **current}
        current.clear()
        if key in seen:
            result.errors.append(f"{path.name}: duplicate key {shown(key)} (twice in this tar)")
        seen.add(key)
        try:
            q = decode_sample(raw)
        except ValueError as exc:
            result.errors.append(f"{path.name}: {_message(exc)}")
            result.keys.append((key, key.rsplit("-", 1)[0]))
            return
        except (
            Image.DecompressionBombError,
            SyntaxError,
            EOFError,
        ) as exc:  # PIL errors decode_sample lets through
            result.errors.append(f"{path.name}: sample {shown(key)}: does not decode: {_message(exc)}")
            result.keys.append((key, key.rsplit("-", 1)[0]))
            return
        m = q.meta
        if f"{m.source_id}-{m.instance:03d}" != key:
            result.errors.append(
                f"{path.name}: sample {shown(key)}: json says {shown(m.source_id)}-{m.instance:03d}"
            )
        if q.source.size != (m.width, m.height):
            result.errors.append(
                f"{path.name}: sample {shown(key)}: source size {q.source.size} differs from json size {(m.width, m.height)}"
            )
        result.keys.append((key, m.source_id))

    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the open itself may fail
    except OSError as exc:
        result.errors.append(f"{path.name}: cannot be read ({exc.strerror or exc})")
        return result
    with fh:
        reader = HashingReader(fh)
        end = None
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
                for info in tf:
                    if not info.isfile():
                        result.errors.append(f"{path.name}: member {info.name!r} is not a regular file")
                        continue
                    key, _, ext = os.path.basename(info.name).partition(".")
                    if ext not in FIELDS:
                        result.errors.append(
                            f"{path.name}: member {info.name!r} is not a format-v1 field ({', '.join(FIELDS)})"
                        )
                        continue
                    if current_key and current_key[0] != key:
                        finish()
                    member = tf.extractfile(info)
                    data = member.read() if member is not None else b""
                    if ext in current:
                        result.errors.append(f"{path.name}: sample {shown(key)}: field {ext} appears twice")
                    if not current_key:
                        current_key.append(key)
                    current[ext] = data
                end = tf.offset  # where tarfile stopped: an end-of-archive block, or damage it took for one
            finish()
        except (tarfile.TarError, OSError, EOFError) as exc:
            # The sample being read when the tar broke is incomplete; the error says so.
            current.clear()
            current_key.clear()
            result.errors.append(
                f"{path.name}: truncated or corrupt tar after {len(result.keys)} complete sample(s): {_message(exc)}"
            )
        if not result.keys and not result.errors:
            result.errors.append(f"{path.name}: holds no sample (an empty archive)")
        try:
            result.sha256 = reader.drain()
            if end is not None:
                # tarfile ends a stream quietly at any block it cannot parse once it has read a
                # member; only a zero block there is a real end of archive.
                fh.seek(end)
                if fh.read(512) != bytes(512):
                    result.errors.append(
                        f"{path.name}: truncated or corrupt tar after {len(result.keys)} complete sample(s): "
                        f"no end-of-archive block at byte {end}"
                    )
        except OSError as exc:
            result.errors.append(f"{path.name}: cannot be read to its end ({exc.strerror or exc})")
    return result


def _message(exc: BaseException) -> str:
    """An exception's message on one line, without object addresses (they differ from run to run)."""
    return shown(re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the bytes", str(exc)))


def validate_release(root: str | Path, workers: int = 1) -> ValidationReport:
    """Validate a release folder (see the module docstring).

    Args:
        root: the release folder.
        workers: processes that check tars in parallel (1: in this process).

    Returns:
        a `ValidationReport`; `report.ok` is False when anything is wrong.
    """
    root = Path(root)
    report = ValidationReport(root)
    errors = report.errors
    if not root.is_dir():
        errors.append(f"{root}: {'does not exist' if not root.exists() else 'not a folder'}")
        return report
    tars = []
    for p in sorted(root.glob("*.tar")):
        if not SHARD_NAME.match(p.name):
            errors.append(f"{shown(p.name)}: not a release shard name ({{train|val}}-{{shard:06d}}.tar)")
        elif why := not_a_file(p):
            errors.append(f"{p.name}: {why}")
        else:
            tars.append(p)
    if not tars:
        errors.append(f"{root}: no release shard ({{train|val}}-{{shard:06d}}.tar)")

    if workers > 1 and len(tars) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tars))) as pool:
            checks = list(pool.map(check_tar, tars))
    else:
        checks = [check_tar(p) for p in tars]

    # Keys unique across the release; each source in one split.
    where: dict[str, tuple[str, int]] = {}
    source_split: dict[str, str] = {}
    crossing: set[str] = set()
    tar_counts: dict[str, int] = {}
    for check in checks:
        errors += check.errors
        split = SHARD_NAME.match(check.name).group(1)  # type: ignore[union-attr]
        tar_counts[check.name] = len(check.keys)
        report.samples[split] = report.samples.get(split, 0) + len(check.keys)
        report.shards[split] = report.shards.get(split, 0) + 1
        for pos, (key, source_id) in enumerate(check.keys):
            if key in where and where[key][0] != check.name:
                errors.append(f"duplicate key {shown(key)}: in {where[key][0]} and {check.name}")
            where.setdefault(key, (check.name, pos))
            other = source_split.setdefault(source_id, split)
            if other != split and source_id not in crossing:
                crossing.add(source_id)  # one line per source, however many of its samples cross
                errors.append(
                    f"source {shown(source_id)} is in both splits ({other} and {split}, e.g. sample {shown(key)})"
                )

    splits = sorted(report.shards)
    _check_indexes(root, splits, tar_counts, errors)
    _check_manifest(root, tar_counts, where, errors)
    _check_release_json(root, report, errors)
    _check_sums(root, {c.name: c.sha256 for c in checks if c.sha256}, errors)
    return report


def _check_indexes(root: Path, splits: list[str], tar_counts: dict[str, int], errors: list[str]) -> None:
    """Each split's wids index lists exactly its tars, with their true sample counts and sizes.

    An index of a split that has no tar is checked too: it must list nothing.
    """
    stray = [
        s
        for s in SPLITS
        if s not in splits and ((root / index_name(s)).exists() or (root / index_name(s)).is_symlink())
    ]
    for split in [*splits, *stray]:
        name = index_name(split)
        path = root / name
        if why := file_problem(path):
            errors.append(f"{name}: {why}" + (f" (the wids index of split {split})" if why == "missing" else ""))
            continue
        index = read_json_model(path, WidsIndex, errors)
        if index is None:
            continue
        listed: dict[str, int] = {}
        for i, entry in enumerate(index.shardlist):
            if entry.url in listed:
                errors.append(f"{name}: shardlist.{i}: lists {shown(entry.url)} a second time")
            listed[entry.url] = entry.nsamples
            if entry.url in tar_counts and entry.url.startswith(f"{split}-"):
                size = (root / entry.url).stat().st_size
                if entry.filesize != size:
                    errors.append(
                        f"{name}: size mismatch: {entry.url} filesize is {entry.filesize} but the tar has {size} bytes"
                    )
        on_disk = {t for t in tar_counts if t.startswith(f"{split}-")}
        for url in sorted(set(listed) - on_disk):
            errors.append(f"{name}: lists {shown(url)}, which is not in the release")
        for tar in sorted(on_disk - set(listed)):
            errors.append(f"{name}: does not list {tar}")
        for url in sorted(set(listed) & on_disk):
            if listed[url] != tar_counts[url]:
                errors.append(
                    f"{name}: count mismatch: {url} nsamples is {listed[url]} but the tar holds {tar_counts[url]}"
                )


def _check_manifest(
    root: Path, tar_counts: dict[str, int], where: dict[str, tuple[str, int]], errors: list[str]
) -> None:
    """One manifest row per sample, naming the tar that holds it, that tar's split and the position."""
    path = root / MANIFEST
    if why := file_problem(path):
        errors.append(f"{MANIFEST}: {why}")
        return
    table = read_manifest(path, errors)
    if table is None:
        return
    columns = [table.column(c).to_pylist() for c in ("key", "split", "shard", "index_in_shard")]
    rows: dict[str, int] = {}
    seen: set[str] = set()
    for row, (key, split, shard, pos) in enumerate(zip(*columns)):
        if key is None or split is None or shard is None:
            continue  # the null is already a finding
        rows[shard] = rows.get(shard, 0) + 1
        if key in seen:
            errors.append(f"{MANIFEST}: row {row}: duplicate key {shown(key)}")
        seen.add(key)
        if not shard.startswith(f"{split}-"):
            errors.append(
                f"{MANIFEST}: row {row}: {shown(key)} is in split {shown(split)} but shard {shown(shard)}"
            )
        if key not in where:
            errors.append(f"{MANIFEST}: row {row}: {shown(key)} is in no tar")
        elif where[key][0] != shard:
            errors.append(
                f"{MANIFEST}: row {row}: {shown(key)} says shard {shown(shard)}, but it is in {where[key][0]}"
            )
        elif pos is not None and pos != where[key][1]:
            errors.append(
                f"{MANIFEST}: row {row}: {shown(key)} says index_in_shard {pos}, but it is sample {where[key][1]} of {shard}"
            )
    for shard in sorted(set(rows) | set(tar_counts)):
        n_rows, n_tar = rows.get(shard, 0), tar_counts.get(shard, 0)
        if n_rows != n_tar:
            errors.append(
                f"{MANIFEST}: count mismatch: {n_rows} row(s) for {shown(shard)}, but the tar holds {n_tar} sample(s)"
            )
    for key in sorted(set(where) - seen):
        errors.append(f"{MANIFEST}: no row for {shown(key)} (in {where[key][0]})")


def _check_release_json(root: Path, report: ValidationReport, errors: list[str]) -> None:
    """`release.json` has the release's shape, a valid license, and the counts of the tars."""
    path = root / RELEASE_JSON
    if why := file_problem(path):
        errors.append(f"{RELEASE_JSON}: {why}")
        return
    info = read_json_model(path, ReleaseInfo, errors)
    if info is None:
        return
    try:
        if normalize_license(info.params.license) != info.params.license:
            errors.append(
                f"{RELEASE_JSON}: params.license: {shown(info.params.license)} is not in canonical form "
                f"({normalize_license(info.params.license)})"
            )
    except ValueError as exc:
        errors.append(f"{RELEASE_JSON}: params.license: {exc}")
    for what, actual in (("samples", report.samples), ("shards", report.shards)):
        stated = getattr(info.counts, what)
        for split in sorted(set(stated) | set(actual)):
            if stated.get(split, 0) != actual.get(split, 0):
                errors.append(
                    f"{RELEASE_JSON}: counts.{what}.{split} is {stated.get(split, 0)}, "
                    f"but the tars hold {actual.get(split, 0)}"
                )


def _check_sums(root: Path, tar_digests: dict[str, str], errors: list[str]) -> None:
    """`SHA256SUMS` lists every file but itself, and every digest matches."""
    from dataengine.release import sha256_file

    path = root / SUMS
    if why := file_problem(path):
        errors.append(f"{SUMS}: {why}")
        return
    listed = read_sums(path, errors)
    if listed is None:
        return
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {SUMS}
    for name in sorted(files - set(listed)):
        errors.append(f"{shown(name)}: not listed in {SUMS}")
    for name in sorted(set(listed) - files):
        errors.append(f"{shown(name)}: listed in {SUMS} but missing")
    for name in sorted(set(listed) & files):
        try:
            actual = tar_digests.get(name) or sha256_file(root / name)
        except OSError as exc:
            errors.append(f"{shown(name)}: cannot be read ({exc.strerror or exc})")
            continue
        if actual != listed[name]:
            errors.append(
                f"{shown(name)}: checksum mismatch ({SUMS} says {listed[name][:12]}..., the file has {actual[:12]}...)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m dataengine.validate` command line; returns the exit status (0 valid, 2 not)."""
    from dataengine.release_cli import OneLineErrorParser, positive_int

    parser = OneLineErrorParser(prog="python -m dataengine.validate", description="Check a dataset release.")
    parser.add_argument("root", metavar="DIR", help="the release folder")
    parser.add_argument(
        "--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="processes that check tars"
    )
    args = parser.parse_args(argv)
    report = validate_release(args.root, workers=args.workers)
    print(report.text(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
