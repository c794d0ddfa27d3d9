"""QuadrupletWriter: commit one output shard (tar + parquet + stats) atomically; know what is done.

Per output shard `{shard:06d}` (docs/data-format.md, format v1):

- `{shard}.tar`: the samples, in input order then instance order; tar headers are fixed (mtime 0,
  owner `lar-gen`, mode 0444), so the same samples always give the same bytes;
- `{shard}.parquet`: one row per input image: status ok / no_instances / failed, error text,
  instance count, sample keys, perceptual hash, the image it duplicates;
- `{shard}_stats.json`: counts per stage, drops per reason, durations; written last, it is the
  completion marker.

Each file is written under a hidden temporary name (`.{name}.tmp`) in the same folder, flushed
and fsynced, then `os.replace`d into place: a reader never sees a half-written file under a final
name, and a shard counts as done only when its stats file exists. A run killed at any moment leaves
at most temporary files (removed by the next run) and final files of an uncommitted shard (rewritten
with the same bytes by the next run).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from dataengine.config import RunConfig
from dataengine.dedup import HashedImage
from dataengine.inputs import InputShard
from dataengine.preview import PREVIEW_NAME
from dataengine.schema import SCHEMA_VERSION, STATS_SUFFIX
from dataengine.stages.base import FAILED, NO_INSTANCES, OK, ImageRecord

TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"
TAR_OWNER = "lar-gen"

PARQUET_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("index", pa.int64()),
        ("uri", pa.string()),
        ("source_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("tags", pa.list_(pa.string())),
        ("instances", pa.int64()),
        ("keys", pa.list_(pa.string())),
        ("phash", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)


class ResumeError(RuntimeError):
    """The output folder holds shards committed from other inputs or another config; rerun with --overwrite."""


# The only names the writer creates in an output folder: committed files and their temporaries.
OUTPUT_NAME = re.compile(r"^\.?\d{6}(\.tar|\.parquet|_stats\.json)(\.tmp)?$")
# Also `python -m dataengine.preview OUT`'s contact sheet, beside the shards.
KNOWN_NAME = re.compile(rf"^(\.?\d{{6}}(\.tar|\.parquet|_stats\.json)|\.?{re.escape(PREVIEW_NAME)})(\.tmp)?$")


class OutputError(ValueError):
    """The output folder cannot be used: a file, not creatable or writable, or holding other files."""


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output folder if needed and check that mining into it loses nothing of the user's.

    A folder that already exists may hold only what a run writes (`000123.tar`, `.parquet`,
    `_stats.json` and their `.tmp` temporaries) and the preview's `preview.html`: resume and
    `--overwrite` replace and remove such names, so any other file means the folder is someone
    else's (photos, another dataset).

    Returns:
        The folder.

    Raises:
        OutputError: naming the folder and what is wrong.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"output {str(out)!r}: a part of the path is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"output {str(out)!r}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output {str(out)!r}: the folder is not writable")
    foreign = sorted(p.name for p in out.iterdir() if not KNOWN_NAME.match(p.name))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(
            f"output {str(out)!r} holds files a mining run does not write ({foreign[0]!r}{more}); "
            "choose a new or empty folder"
        )
    return out


class QuadrupletWriter:
    """Writes committed shards into one output folder and tells which shards are already committed.

    Args:
        out_dir: the output folder (created).
        cfg: the run's config; its hash is checked against committed shards on resume.

    Raises:
        OutputError: the folder cannot be used (`check_output_dir`).
    """

    def __init__(self, out_dir: str | os.PathLike, cfg: RunConfig):
        self.out_dir = check_output_dir(out_dir)
        self.cfg = cfg
        self.config_hash = cfg.config_hash()
        self._remove_stale_temporaries()

    # ------------------------------------------------------------------ paths and state

    def path(self, shard: InputShard | int, suffix: str) -> Path:
        index = shard.index if isinstance(shard, InputShard) else shard
        return self.out_dir / f"{index:06d}{suffix}"

    def is_committed(self, shard: InputShard) -> bool:
        """Whether the shard's stats file exists, checked against this run's inputs and config.

        Raises:
            ResumeError: the committed shard was made from other images or with another config.
        """
        stats_path = self.path(shard, STATS_SUFFIX)
        if not stats_path.is_file():
            return False
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResumeError(
                f"{stats_path}: not a readable stats file ({exc}); use a new --output or --overwrite"
            ) from exc
        if stats.get("input_fingerprint") != shard.fingerprint():
            raise ResumeError(
                f"{stats_path}: committed from other input images than this run's shard {shard.name}; "
                "use a new --output or --overwrite"
            )
        if stats.get("config_hash") != self.config_hash:
            raise ResumeError(
                f"{stats_path}: committed with config {stats.get('config_hash')}, this run has {self.config_hash}; "
                "use a new --output or --overwrite"
            )
        return True

    def pending(self, shards: Sequence[InputShard], overwrite: bool = False) -> list[InputShard]:
        """The shards still to mine. With `overwrite`, every shard is uncommitted first and redone."""
        if overwrite:
            for shard in shards:
                self.uncommit(shard)
            return list(shards)
        return [s for s in shards if not self.is_committed(s)]

    def uncommit(self, shard: InputShard) -> None:
        """Remove a shard's completion marker first (so it is never half-committed), then its files."""
        for suffix in (STATS_SUFFIX, ".parquet", ".tar"):
            self.path(shard, suffix).unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        for tmp in self.out_dir.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
            if OUTPUT_NAME.match(tmp.name):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ commit

    def commit(self, shard: InputShard, records: Sequence[ImageRecord], seconds: float = 0.0) -> dict:
        """Write the shard's tar, parquet and (last) stats; returns the stats dict.

        Args:
            shard: the input shard the records come from.
            records: one finished record per input image of the shard (any order).
            seconds: wall time the engine spent on the shard (reported in the stats).

        Raises:
            ValueError: the records do not match the shard's images one to one.
        """
        records = sorted(records, key=lambda r: r.index)
        if [r.index for r in records] != list(range(len(shard.items))):
            raise ValueError(
                f"shard {shard.name}: got records {[r.index for r in records]} for {len(shard.items)} input images"
            )
        start = time.perf_counter()
        self._atomic(self.path(shard, ".tar"), lambda f: self._write_tar(f, records))
        self._atomic(self.path(shard, ".parquet"), lambda f: pq.write_table(self._table(shard, records), f))
        stats = shard_stats(shard, records, self.cfg, self.config_hash)
        stats["seconds"]["write"] = round(time.perf_counter() - start, 4)
        stats["seconds"]["wall"] = round(seconds, 4)
        payload = json.dumps(stats, indent=2, sort_keys=True).encode("utf-8")
        self._atomic(self.path(shard, STATS_SUFFIX), lambda f: f.write(payload))
        return stats

    def _atomic(self, final: Path, write) -> None:
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _write_tar(f, records: Sequence[ImageRecord]) -> None:
        # Fixed mtime/owner/mode: the same samples give byte-identical tars (exact resume checks).
        with wds.TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, mtime=0.0, encoder=False) as sink:
            for record in records:
                for sample in record.samples:
                    sink.write(sample)

    @staticmethod
    def _table(shard: InputShard, records: Sequence[ImageRecord]) -> pa.Table:
        rows = {name: [] for name in PARQUET_SCHEMA.names}
        for r in records:
            height, width = r.size or (None, None)
            rows["shard"].append(shard.index)
            rows["index"].append(r.index)
            rows["uri"].append(r.uri)
            rows["source_id"].append(r.source_id or None)
            rows["status"].append(r.status)
            rows["error"].append(r.error or None)
            rows["width"].append(width)
            rows["height"].append(height)
            rows["tags"].append(list(r.tags))
            rows["instances"].append(len(r.samples))
            rows["keys"].append([s["__key__"] for s in r.samples])
            rows["phash"].append(r.phash or None)
            rows["duplicate_of"].append(r.duplicate_of or None)
        return pa.table(rows, schema=PARQUET_SCHEMA)

    def committed_hashes(self, shard: InputShard) -> list[HashedImage]:
        """The dedup hashes of a committed shard's images, in shard order, from its parquet.

        Raises:
            ResumeError: the parquet is unreadable or lacks the hash columns.
        """
        path = self.path(shard, ".parquet")
        try:
            table = pq.read_table(path, columns=["index", "uri", "source_id", "phash"])
        except (OSError, pa.ArrowException) as exc:
            raise ResumeError(
                f"{path}: cannot read the image hashes of a committed shard ({exc}); use a new --output or --overwrite"
            ) from exc
        rows = sorted(table.to_pylist(), key=lambda r: r["index"])
        if [r["index"] for r in rows] != list(range(len(shard.items))):
            raise ResumeError(f"{path}: does not hold one row per image of shard {shard.name}; use --overwrite")
        return [HashedImage(r["uri"], r["source_id"] or "", r["phash"] or "") for r in rows]


def shard_stats(shard: InputShard, records: Iterable[ImageRecord], cfg: RunConfig, config_hash: str) -> dict:
    """Counters of one shard: images by status, items out of each stage, drops by reason, seconds per stage."""
    records = list(records)
    status = Counter({OK: 0, NO_INSTANCES: 0, FAILED: 0})
    stages: Counter = Counter()
    images_in: Counter = Counter()
    drops: Counter = Counter()
    seconds: Counter = Counter()
    for r in records:
        status[r.status] += 1
        drops.update(r.drops)
        for stage, n in r.counts.items():
            stages[stage] += n
        for stage, s in r.seconds.items():
            seconds[stage] += s
            images_in[stage] += 1
    return {
        "format_version": SCHEMA_VERSION,
        "shard": shard.name,
        "pipeline": cfg.pipeline_name,
        "config_hash": config_hash,
        "input_fingerprint": shard.fingerprint(),
        "images": len(records),
        "samples": sum(len(r.samples) for r in records),
        "status": dict(sorted(status.items())),
        "stage_images_in": dict(sorted(images_in.items())),
        "stage_items_out": dict(sorted(stages.items())),
        "drops": dict(sorted(drops.items())),
        "seconds": {k: round(v, 4) for k, v in sorted(seconds.items())},
    }
