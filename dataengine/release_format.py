"""The files of a dataset release beside the tars, as checkable types: `release.json`, the wids
index, `manifest.parquet`, `SHA256SUMS`, and the release's license.

`dataengine.release` writes these files and `dataengine.validate` reads them back; both go
through this module so a reader never trusts a shape the writer did not promise. Every reader
here turns a damaged file (truncated, not UTF-8, the wrong JSON type, a missing or extra field, a
null or mistyped parquet column, a malformed checksum line) into findings: one line each, naming
the file, the field or row, and what is wrong. See docs/dataset-release.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dataengine.schema import SCHEMA_VERSION

RELEASE_FORMAT = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.parquet"
SUMS = "SHA256SUMS"
RELEASE_JSON = "release.json"
INDEX_KIND = "wids-shard-index-v1"
SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")
SUM_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")
MAX_PER_FILE = 20  # findings reported per file: a wholly wrong file is named, not listed row by row

# "other": the builder declares no license of their own (the terms of the source images apply).
OTHER_LICENSE = "other"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("index_in_shard", pa.int32()),
        ("source_id", pa.string()),
        ("instance", pa.int32()),
        ("tag", pa.string()),
        ("caption", pa.string()),
        ("box_xyxy", pa.list_(pa.float64(), 4)),
        ("box_score", pa.float64()),
        ("text_score", pa.float64()),
        ("mask_score", pa.float64()),
        ("mask_area_frac", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("subject_width", pa.int32()),
        ("subject_height", pa.int32()),
        ("nbytes", pa.int64()),
        ("uri", pa.string()),
        ("pipeline", pa.string()),
        ("config_hash", pa.string()),
        ("mined_shard", pa.string()),
    ]
)


def shard_name(split: str, shard: int) -> str:
    """`{split}-{shard:06d}.tar`, the name of a release shard."""
    return f"{split}-{shard:06d}.tar"


def index_name(split: str) -> str:
    """The wids shard index of a split: `{split}.index.json`."""
    return f"{split}.index.json"


def shown(text: str) -> str:
    """`text` as is when printable, else its escaped repr: a finding must stay on one line.

    Names come from tar headers and files the user gave us, which may hold newlines or bytes
    that are not UTF-8 (decoded with surrogateescape, which cannot be printed or written as UTF-8).
    """
    if text.isprintable():
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return repr(text)


def normalize_license(value: str) -> str:
    """The canonical form of a release license: an SPDX license id (e.g. `CC-BY-4.0`) or `other`.

    Args:
        value: an SPDX id in any letter case, or `other`.

    Returns:
        `other`, or the SPDX id in its canonical spelling.

    Raises:
        ValueError: not a single known SPDX id (expressions such as `MIT OR Apache-2.0` and
            `LicenseRef-*` are refused too: the card's front matter holds one id).
    """
    from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression

    text = value.strip()
    if text.lower() == OTHER_LICENSE:
        return OTHER_LICENSE
    try:
        canonical = canonicalize_license_expression(text)
    except InvalidLicenseExpression:
        canonical = ""
    if not canonical or " " in canonical or canonical.startswith("LicenseRef-"):
        raise ValueError(
            f"{value!r} is not an SPDX license id (e.g. CC-BY-4.0, CC-BY-NC-4.0, Apache-2.0, MIT) or 'other'"
        )
    return canonical


def hub_license(spdx: str) -> str:
    """The Hugging Face card value for a license: the hub's ids are the lower-cased SPDX ids."""
    return spdx.lower()


# --------------------------------------------------------------------------- JSON files


class _Strict(BaseModel):
    """No coercion and no unknown keys: the release writes exactly these shapes."""

    model_config = ConfigDict(extra="forbid", strict=True)


Split = Literal["train", "val"]
Count = Field(ge=0)


class ShardEntry(_Strict):
    url: str
    nsamples: int = Count
    filesize: int = Count


class WidsIndex(_Strict):
    """`{split}.index.json`: a wids shard index."""

    kind: Literal["wids-shard-index-v1"] = Field(alias="__kind__")
    wids_version: Literal[1]
    shardlist: list[ShardEntry]


class ReleaseParams(_Strict):
    inputs: list[str]
    seed: int = Count
    val_fraction: float = Field(ge=0, lt=1)
    samples_per_shard: int | None = Field(ge=1)
    shard_bytes: int | None = Field(ge=1)
    license: str


class ReleaseCounts(_Strict):
    samples: dict[Split, int]
    sources: dict[Split, int]
    shards: dict[Split, int]
    bytes: dict[Split, int]


class ReleaseInputs(_Strict):
    committed_shards: int = Count
    uncommitted_shards_skipped: list[str]
    samples_read: int = Count
    duplicates_dropped: int = Count
    conflicting_duplicates: list[str]
    rejected: int = Count
    rejected_by_reason: dict[str, int]
    rejected_samples: list[str]
    ignored_members: int = Count
    input_errors: list[str]
    image_status: dict[str, int]
    mining_stats: dict[str, float]


class Provenance(_Strict):
    pipeline: str
    config_hash: str
    models: dict[str, str]
    samples: int = Count


class ReleaseInfo(_Strict):
    """`release.json`: the parameters and counts of a release."""

    release_format: Literal[1]
    sample_schema_version: Literal[1]
    fields: list[str]
    params: ReleaseParams
    counts: ReleaseCounts
    inputs: ReleaseInputs
    provenance: list[Provenance]


assert SCHEMA_VERSION == 1, "ReleaseInfo.sample_schema_version pins the sample schema version"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(shown(str(p)) for p in loc)


def read_json_model(path: Path, model: type[BaseModel], findings: list[str]) -> Any:
    """Read and check one JSON file of the release against `model`.

    Args:
        path: the file.
        model: the pydantic model it must satisfy.
        findings: where problems go, one line each, prefixed with the file name.

    Returns:
        the model instance, or None when the file is unusable (the reasons are in `findings`).
    """
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        findings.append(f"{name}: cannot be read ({exc.strerror or exc})")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        findings.append(f"{name}: not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})")
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        for err in errors[:MAX_PER_FILE]:
            msg = err["msg"]
            if err["type"] == "model_type":
                msg = f"must be a JSON object, not {_json_type(err.get('input'))}"
            elif err["type"] == "json_invalid":
                msg = f"not valid JSON ({msg.removeprefix('Invalid JSON: ')}); truncated?"
            where = f"{_loc(err['loc'])}: " if err["loc"] else ""
            findings.append(f"{name}: {where}{msg}")
        if len(errors) > MAX_PER_FILE:
            findings.append(f"{name}: ... and {len(errors) - MAX_PER_FILE} more problem(s)")
        return None


# --------------------------------------------------------------------------- SHA256SUMS


def read_sums(path: Path, findings: list[str]) -> dict[str, str] | None:
    """Read `SHA256SUMS` (`<64 hex>  <path>` per line, UTF-8); malformed lines become findings.

    Returns:
        path -> digest of the well-formed lines, or None when the file cannot be read at all.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        findings.append(f"{SUMS}: cannot be read ({exc.strerror or exc})")
        return None
    listed: dict[str, str] = {}
    bad = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline
    for n, raw in enumerate(lines, 1):
        problem = None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"line {n} is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        else:
            match = SUM_LINE.match(line)
            if not match:
                problem = f"line {n} is not '<sha256 in lower-case hex>  <path>': {shown(line[:80])}"
            elif match.group(2) in listed:
                problem = f"line {n} lists {shown(match.group(2))} a second time"
            else:
                listed[match.group(2)] = match.group(1)
        if problem:
            bad += 1
            if bad <= MAX_PER_FILE:
                findings.append(f"{SUMS}: {problem}")
    if bad > MAX_PER_FILE:
        findings.append(f"{SUMS}: ... and {bad - MAX_PER_FILE} more malformed line(s)")
    return listed


# --------------------------------------------------------------------------- manifest


def read_manifest(path: Path, findings: list[str]) -> pa.Table | None:
    """Read `manifest.parquet` and check its columns against `MANIFEST_SCHEMA` and for nulls.

    Returns:
        the table when the columns the validator relies on (`key`, `split`, `shard`,
        `index_in_shard`) are present with their types; rows with a null in them are still in the
        table (the nulls are findings). None when it cannot be used.
    """
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        findings.append(f"{MANIFEST}: not a readable parquet file ({shown(first_line)})")
        return None
    got = table.schema
    for f in MANIFEST_SCHEMA:
        i = got.get_field_index(f.name)
        if i < 0:
            findings.append(f"{MANIFEST}: column {f.name} is missing")
        elif not got.field(i).type.equals(f.type):
            findings.append(f"{MANIFEST}: column {f.name} is {got.field(i).type}, expected {f.type}")
        elif table.column(f.name).null_count:
            column = table.column(f.name)
            first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            findings.append(
                f"{MANIFEST}: column {f.name} has {column.null_count} null(s) (first in row {first})"
            )
    for name in got.names:
        if MANIFEST_SCHEMA.get_field_index(name) < 0:
            findings.append(f"{MANIFEST}: column {shown(name)} is not in the manifest schema")
    needed = ("key", "split", "shard", "index_in_shard")
    for n in needed:
        i = got.get_field_index(n)
        if i < 0 or not got.field(i).type.equals(MANIFEST_SCHEMA.field(n).type):
            return None
    return table
