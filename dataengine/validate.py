"""Check a dataset release (`python -m dataengine.validate DIR`), also run at the end of every release.

Checks, each failure named by file and sample:

- every tar reads to its end (a truncated or corrupt tar is named);
- every sample has the five fields of format v1, decodes, and keeps the contract
  (`dataengine.schema.decode_sample`: source RGB, mask L 0/255 of the source size, subject RGBA,
  non-empty caption, valid json), and its json agrees with its key and its source size;
- keys are unique across the whole release, and no source image is in two splits;
- each split's wids index lists exactly the split's tars with their true sample counts;
- `manifest.parquet` has one row per sample, in the right split and shard;
- `SHA256SUMS` lists every file, and every digest matches.

Exits 0 with a one-line summary, or 1 with a readable report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.release import INDEX_KIND, MANIFEST, SHARD_NAME, SUMS, index_name
from dataengine.schema import FIELDS, decode_sample

MAX_SHOWN = 200  # a report longer than this is cut, with the count of what is left out


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
        shown = self.errors[:MAX_SHOWN]
        more = len(self.errors) - len(shown)
        lines = [f"INVALID {self.root}: {len(self.errors)} problem(s)"] + [f"  - {e}" for e in shown]
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
    seen: set[str] = set()

    def finish() -> None:
        if not current:
            return
        key = current["__key__"].decode()
        raw = {"__key__": key, **{k: v for k, v in current.items() if k != "__key__"}}
        current.clear()
        if key in seen:
            result.errors.append(f"{path.name}: duplicate key {key} (twice in this tar)")
        seen.add(key)
        try:
            q = decode_sample(raw)
        except ValueError as exc:
            result.errors.append(f"{path.name}: {exc}")
            result.keys.append((key, key.rsplit("-", 1)[0]))
            return
        m = q.meta
        if f"{m.source_id}-{m.instance:03d}" != key:
            result.errors.append(f"{path.name}: sample {key}: json says {m.source_id}-{m.instance:03d}")
        if q.source.size != (m.width, m.height):
            result.errors.append(
                f"{path.name}: sample {key}: source size {q.source.size} differs from json size {(m.width, m.height)}"
            )
        result.keys.append((key, m.source_id))

    with open(path, "rb") as fh:
        reader = HashingReader(fh)
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
                    if current and current["__key__"].decode() != key:
                        finish()
                    member = tf.extractfile(info)
                    data = member.read() if member is not None else b""
                    if ext in current:
                        result.errors.append(f"{path.name}: sample {key}: field {ext} appears twice")
                    current["__key__"] = key.encode()
                    current[ext] = data
            finish()
        except (tarfile.TarError, OSError, EOFError) as exc:
            current.clear()  # the sample being read when the tar broke is incomplete; the error says so
            result.errors.append(
                f"{path.name}: truncated or corrupt tar after {len(result.keys)} complete sample(s): {exc}"
            )
        result.sha256 = reader.drain()
    return result


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
        errors.append(f"{root}: not a folder")
        return report
    tars = sorted(p for p in root.glob("*.tar"))
    bad_names = [p.name for p in tars if not SHARD_NAME.match(p.name)]
    errors += [f"{n}: not a release shard name ({{train|val}}-{{shard:06d}}.tar)" for n in bad_names]
    tars = [p for p in tars if SHARD_NAME.match(p.name)]
    if not tars:
        errors.append(f"{root}: no release shard ({{train|val}}-{{shard:06d}}.tar)")

    if workers > 1 and len(tars) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tars))) as pool:
            checks = list(pool.map(check_tar, tars))
    else:
        checks = [check_tar(p) for p in tars]

    # Keys unique across the release; each source in one split.
    where: dict[str, str] = {}
    source_split: dict[str, str] = {}
    crossing: set[str] = set()
    tar_counts: dict[str, int] = {}
    for check in checks:
        errors += check.errors
        split = SHARD_NAME.match(check.name).group(1)  # type: ignore[union-attr]
        tar_counts[check.name] = len(check.keys)
        report.samples[split] = report.samples.get(split, 0) + len(check.keys)
        report.shards[split] = report.shards.get(split, 0) + 1
        for key, source_id in check.keys:
            if key in where and where[key] != check.name:
                errors.append(f"duplicate key {key}: in {where[key]} and {check.name}")
            where.setdefault(key, check.name)
            other = source_split.setdefault(source_id, split)
            if other != split and source_id not in crossing:
                crossing.add(source_id)  # one line per source, however many of its samples cross
                errors.append(f"source {source_id} is in both splits ({other} and {split}, e.g. sample {key})")

    splits = sorted(report.shards)
    _check_indexes(root, splits, tar_counts, errors)
    _check_manifest(root, tar_counts, where, errors)
    _check_sums(root, {c.name: c.sha256 for c in checks}, errors)
    return report


def _check_indexes(root: Path, splits: list[str], tar_counts: dict[str, int], errors: list[str]) -> None:
    """Each split's wids index lists exactly its tars, with their true sample counts."""
    for split in splits:
        name = index_name(split)
        path = root / name
        if not path.is_file():
            errors.append(f"{name}: missing (the wids index of split {split})")
            continue
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            errors.append(f"{name}: not valid JSON ({exc})")
            continue
        if index.get("__kind__") != INDEX_KIND or index.get("wids_version") != 1:
            errors.append(f"{name}: not a wids shard index (__kind__ {INDEX_KIND!r}, wids_version 1)")
        listed = {}
        for entry in index.get("shardlist") or []:
            if not isinstance(entry, dict) or "url" not in entry or "nsamples" not in entry:
                errors.append(f"{name}: shardlist entry {entry!r} lacks url/nsamples")
                continue
            listed[entry["url"]] = entry["nsamples"]
        on_disk = {t for t in tar_counts if t.startswith(f"{split}-")}
        for url in sorted(set(listed) - on_disk):
            errors.append(f"{name}: lists {url}, which is not in the release")
        for tar in sorted(on_disk - set(listed)):
            errors.append(f"{name}: does not list {tar}")
        for url in sorted(set(listed) & on_disk):
            if listed[url] != tar_counts[url]:
                errors.append(
                    f"{name}: count mismatch: {url} nsamples is {listed[url]} but the tar holds {tar_counts[url]}"
                )


def _check_manifest(root: Path, tar_counts: dict[str, int], where: dict[str, str], errors: list[str]) -> None:
    """One manifest row per sample, naming the tar that holds it and that tar's split."""
    path = root / MANIFEST
    if not path.is_file():
        errors.append(f"{MANIFEST}: missing")
        return
    try:
        table = pq.read_table(path, columns=["key", "split", "shard"])
    except (OSError, KeyError, pa.ArrowException) as exc:
        errors.append(f"{MANIFEST}: unreadable or lacks key/split/shard columns ({exc})")
        return
    keys = table.column("key").to_pylist()
    splits = table.column("split").to_pylist()
    shards = table.column("shard").to_pylist()
    rows: dict[str, int] = {}
    seen: set[str] = set()
    for key, split, shard in zip(keys, splits, shards):
        rows[shard] = rows.get(shard, 0) + 1
        if key in seen:
            errors.append(f"{MANIFEST}: duplicate key {key}")
        seen.add(key)
        if not shard.startswith(f"{split}-"):
            errors.append(f"{MANIFEST}: {key} is in split {split} but shard {shard}")
        if key not in where:
            errors.append(f"{MANIFEST}: {key} is in no tar")
        elif where[key] != shard:
            errors.append(f"{MANIFEST}: {key} says shard {shard}, but it is in {where[key]}")
    for shard in sorted(set(rows) | set(tar_counts)):
        n_rows, n_tar = rows.get(shard, 0), tar_counts.get(shard, 0)
        if n_rows != n_tar:
            errors.append(
                f"{MANIFEST}: count mismatch: {n_rows} row(s) for {shard}, but the tar holds {n_tar} sample(s)"
            )
    for key in sorted(set(where) - seen):
        errors.append(f"{MANIFEST}: no row for {key} (in {where[key]})")


def _check_sums(root: Path, tar_digests: dict[str, str], errors: list[str]) -> None:
    """`SHA256SUMS` lists every file but itself, and every digest matches."""
    from dataengine.release import sha256_file

    path = root / SUMS
    if not path.is_file():
        errors.append(f"{SUMS}: missing")
        return
    listed: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            errors.append(f"{SUMS}: line {n} is not '<sha256>  <path>': {line!r}")
            continue
        listed[name] = digest
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {SUMS}
    for name in sorted(files - set(listed)):
        errors.append(f"{name}: not listed in {SUMS}")
    for name in sorted(set(listed) - files):
        errors.append(f"{name}: listed in {SUMS} but missing")
    for name in sorted(set(listed) & files):
        actual = tar_digests.get(name) or sha256_file(root / name)
        if actual != listed[name]:
            errors.append(
                f"{name}: checksum mismatch ({SUMS} says {listed[name][:12]}..., the file has {actual[:12]}...)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m dataengine.validate` command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dataengine.validate", description="Check a dataset release."
    )
    parser.add_argument("root", metavar="DIR", help="the release folder")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that check tars"
    )
    args = parser.parse_args(argv)
    report = validate_release(args.root, workers=args.workers)
    print(report.text(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
