"""The quadruplet sample contract (shard format v1): field names, keys, metadata, encode/decode.

Every writer (the engine, the release tool) and every reader (validate, the trainer) goes through
this module, so the format lives in one place. See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

SOURCE = "source.jpg"
MASK = "mask.png"
SUBJECT = "subject.png"
TEXT = "txt"
META = "json"
FIELDS: tuple[str, ...] = (SOURCE, MASK, SUBJECT, TEXT, META)

KEY_PATTERN = re.compile(r"^[0-9a-f]{16}-\d{3}$")
# A mined shard `{shard:06d}` is committed when this file of it exists (written last).
STATS_SUFFIX = "_stats.json"

# What a sample's caption describes: the instance (the paper's data) or the whole image (its baseline).
CaptionKind = Literal["regional", "global"]
CAPTION_KINDS: tuple[str, ...] = ("regional", "global")


def source_id_from_bytes(data: bytes) -> str:
    """A stable id for a source image: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def sample_key(source_id: str, instance: int) -> str:
    """`{source_id}-{instance:03d}`: dot-free, so WebDataset never splits it into extensions.

    Raises:
        ValueError: the source id is not 16 hex digits or the instance is outside 0..999.
    """
    if not re.fullmatch(r"[0-9a-f]{16}", source_id):
        raise ValueError(f"source_id must be 16 lowercase hex digits, got {source_id!r}")
    if not 0 <= instance <= 999:
        raise ValueError(f"instance must be in 0..999, got {instance}")
    return f"{source_id}-{instance:03d}"


class SampleMeta(BaseModel):
    """The `json` field of a sample."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    source_id: str
    instance: int = Field(ge=0, le=999)
    uri: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    tag: str
    box_xyxy: list[float] = Field(min_length=4, max_length=4)
    box_score: float
    text_score: float
    mask_score: float
    mask_area_frac: float = Field(ge=0, le=1)
    models: dict[str, str]
    pipeline: str
    config_hash: str
    # Added within format v1 (older shards lack them; None = not computed).
    mask_stability: float | None = Field(None, ge=0, le=1)
    clip_score: float | None = Field(None, ge=-1, le=1)
    captions: dict[CaptionKind, str] | None = None

    def caption(self, kind: str, text: str) -> str | None:
        """The sample's `kind` caption (`regional` or `global`), or None when it was not mined.

        `text` is the sample's `txt`: shards written before `captions` existed hold only the
        regional caption, there.
        """
        if self.captions is not None:
            return self.captions.get(kind)
        return text if kind == "regional" else None


@dataclass
class Quadruplet:
    """One decoded sample: source RGB, mask L (0/255), subject RGBA, caption, metadata."""

    key: str
    source: Image.Image
    mask: Image.Image
    subject: Image.Image
    text: str
    meta: SampleMeta


def encode_sample(q: Quadruplet, jpeg_quality: int = 95) -> dict[str, Any]:
    """The WebDataset dict (`__key__` + five encoded fields) for a quadruplet.

    Raises:
        ValueError: a field has the wrong mode or size, or the key is malformed.
    """
    check_quadruplet(q)
    src = io.BytesIO()
    q.source.save(src, format="JPEG", quality=jpeg_quality, subsampling=0)
    mask = io.BytesIO()
    q.mask.save(mask, format="PNG", optimize=False)
    subj = io.BytesIO()
    q.subject.save(subj, format="PNG", optimize=False)
    meta = json.dumps(q.meta.model_dump(mode="json"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {
        "__key__": q.key,
        SOURCE: src.getvalue(),
        MASK: mask.getvalue(),
        SUBJECT: subj.getvalue(),
        TEXT: q.text.encode("utf-8"),
        META: meta,
    }


def decode_sample(raw: dict[str, Any], load_source: bool = True) -> Quadruplet:
    """Decode a raw WebDataset sample (bytes per field) into a checked Quadruplet.

    Args:
        load_source: False only opens the source JPEG (its header gives the mode and size the
            checks need) and leaves its pixels undecoded, for a reader that decodes it later, e.g.
            at a reduced scale (the training loader).

    Raises:
        ValueError: a field is missing, does not decode, or breaks the contract.
    """
    key = raw.get("__key__", "?")
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise ValueError(f"sample {key}: missing field(s) {', '.join(missing)}")
    try:
        if load_source:
            source = _open(raw[SOURCE])
        else:
            source = Image.open(io.BytesIO(_bytes(raw[SOURCE])))
            if source.format != "JPEG":
                raise ValueError(f"source is {source.format}, expected JPEG")
        mask = _open(raw[MASK])
        subject = _open(raw[SUBJECT])
        text = _bytes(raw[TEXT]).decode("utf-8")
        meta = SampleMeta.model_validate(json.loads(_bytes(raw[META]).decode("utf-8")))
    except (OSError, ValueError) as exc:
        raise ValueError(f"sample {key}: does not decode: {exc}") from exc
    q = Quadruplet(key=key, source=source, mask=mask, subject=subject, text=text, meta=meta)
    check_quadruplet(q)
    return q


# 1 where a mask value is neither 0 nor 255. A lookup then `getbbox` (both in PIL's C) checks a
# 12-megapixel mask in about a third of the time of `histogram()` (measured 9 vs 20-28 ms).
_NON_BINARY = [0] + [1] * 254 + [0]


def check_quadruplet(q: Quadruplet) -> None:
    """Raise ValueError naming the sample and the broken rule, if any."""
    problems = []
    if not KEY_PATTERN.match(q.key):
        problems.append(f"key {q.key!r} is not '{{source_id}}-{{instance:03d}}'")
    if q.source.mode != "RGB":
        problems.append(f"source mode is {q.source.mode}, expected RGB")
    if q.mask.mode != "L":
        problems.append(f"mask mode is {q.mask.mode}, expected L")
    if q.mask.size != q.source.size:
        problems.append(f"mask size {q.mask.size} differs from source size {q.source.size}")
    if q.subject.mode != "RGBA":
        problems.append(f"subject mode is {q.subject.mode}, expected RGBA")
    if not q.text.strip():
        problems.append("caption is empty")
    if q.meta.captions is not None:
        main = next((q.meta.captions[k] for k in CAPTION_KINDS if k in q.meta.captions), None)
        if main is None:
            problems.append("json captions is empty")
        elif main != q.text:
            problems.append("txt is not the json's regional caption (or, without one, its global caption)")
        if any(not v.strip() for v in q.meta.captions.values()):
            problems.append("a json caption is empty")
    if q.mask.mode == "L" and q.mask.point(_NON_BINARY).getbbox() is not None:
        problems.append("mask has values other than 0 and 255")
    if problems:
        raise ValueError(f"sample {q.key}: " + "; ".join(problems))


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"expected bytes, got {type(value).__name__}")


def _open(value: Any) -> Image.Image:
    img = Image.open(io.BytesIO(_bytes(value)))
    img.load()
    return img
