"""`python -m dataengine.preview OUT`: an HTML contact sheet of a mining run's samples, to judge it by eye.

One self-contained page (images embedded as data URIs, so it can be mailed or opened anywhere):
the run's counts and drop reasons summed over the committed shards, then one card per sample,
in shard and key order: the source with the instance's mask tinted and its box drawn, the subject
cut-out on a checkerboard, the caption(s), the image's tags, and the scores (grounding box and
text, SAM predicted IoU and stability, CLIP caption ↔ crop). Only committed shards (with their
`_stats.json`) are read; a sample that does not decode is listed with its reason instead.

Written atomically to `OUT/preview.html` unless `--out` says otherwise; bad arguments end in one
line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dataengine.schema import STATS_SUFFIX, Quadruplet, decode_sample

PREVIEW_NAME = "preview.html"  # in the mined folder, where the engine's output check accepts it
THUMB = 256  # longest side of the source thumbnail, pixels
MASK_TINT = np.array([255, 64, 160], dtype=np.float32)
BOX_COLOUR = (255, 220, 0)


class PreviewError(ValueError):
    """The mined folder or the output path cannot be used; the message is one line naming it."""


def overlay(q: Quadruplet, size: int = THUMB) -> Image.Image:
    """The source with the mask tinted (45 %) and the box outlined, its longest side scaled to `size`."""
    source = np.asarray(q.source, dtype=np.float32)
    inside = (np.asarray(q.mask) > 127)[..., None]
    tinted = np.where(inside, source * 0.55 + MASK_TINT * 0.45, source).astype(np.uint8)
    image = Image.fromarray(tinted)
    scale = size / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    else:
        scale = 1.0
    x0, y0, x1, y1 = (v * scale for v in q.meta.box_xyxy)
    ImageDraw.Draw(image).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX_COLOUR, width=2)
    return image


def data_uri(image: Image.Image, fmt: str) -> str:
    """The image encoded as a `data:` URI (JPEG for photos, PNG to keep an alpha channel)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def committed_shards(folder: Path) -> list[str]:
    """Names (`000003`) of the shards whose stats file exists, in order."""
    return sorted(p.name[: -len(STATS_SUFFIX)] for p in folder.glob(f"*{STATS_SUFFIX}"))


def image_tags(folder: Path, shard: str) -> dict[str, list[str]]:
    """source_id -> tags, from a shard's parquet (empty when it cannot be read: tags are a nicety)."""
    try:
        rows = pq.read_table(folder / f"{shard}.parquet", columns=["source_id", "tags"]).to_pylist()
    except (OSError, KeyError, pa.ArrowException):
        return {}
    return {r["source_id"]: r["tags"] or [] for r in rows if r["source_id"]}


def iter_samples(folder: Path, shards: list[str]) -> Iterator[tuple[str, dict]]:
    """(shard, raw sample) over the committed tars, in order.

    Raises:
        PreviewError: a tar is missing or not a tar.
    """
    for shard in shards:
        tar = folder / f"{shard}.tar"
        if not tar.is_file():
            raise PreviewError(f"{tar}: missing, but its {shard}{STATS_SUFFIX} says the shard is committed")
        try:
            with tarfile.open(tar) as archive:
                yield from ((shard, raw) for raw in _grouped(archive))
        except (OSError, tarfile.TarError) as exc:
            raise PreviewError(f"{tar}: cannot be read as a tar: {exc}") from exc


def _grouped(archive: tarfile.TarFile) -> Iterator[dict]:
    """Consecutive members with the same key as one raw sample, as WebDataset groups them.

    (tarfile rather than webdataset: webdataset imports torch, seconds of start-up for a page.)
    """
    sample: dict = {}
    for member in archive:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, dot, field = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if not dot:
            continue
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        sample[field] = archive.extractfile(member).read()
    if sample:
        yield sample


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def card(q: Quadruplet, tags: list[str]) -> str:
    """One sample's HTML card."""
    m = q.meta
    captions = m.captions if m.captions is not None else {"regional": q.text}
    caption_html = "".join(
        f'<p class="cap"><b>{html.escape(kind)}</b> {html.escape(text)}</p>' for kind, text in captions.items()
    )
    scores = [
        ("box", m.box_score), ("text", m.text_score), ("mask IoU", m.mask_score),
        ("stability", m.mask_stability), ("CLIP", m.clip_score),
    ]  # fmt: skip
    score_html = " · ".join(f"{name} {_score(v)}" for name, v in scores)
    tag_html = ", ".join(f"<b>{html.escape(t)}</b>" if t == m.tag else html.escape(t) for t in tags) or html.escape(m.tag)
    return (
        f'<div class="card" id="{html.escape(q.key)}">'
        f'<div class="pics"><img src="{data_uri(overlay(q), "JPEG")}" alt="source, box and mask">'
        f'<img class="subject" src="{data_uri(_thumb(q.subject), "PNG")}" alt="subject"></div>'
        f'<p class="key">{html.escape(q.key)} · {html.escape(Path(m.uri).name)} · {m.width}×{m.height}</p>'
        f"{caption_html}<p>tags: {tag_html}</p><p class=\"scores\">{score_html}</p></div>"
    )


def _thumb(image: Image.Image, size: int = THUMB // 2) -> Image.Image:
    out = image.copy()
    out.thumbnail((size, size))
    return out


def run_totals(folder: Path, shards: list[str]) -> tuple[Counter, Counter, int, int]:
    """(image status counts, drop counts, images, samples) summed over the committed shards' stats."""
    status: Counter = Counter()
    drops: Counter = Counter()
    images = samples = 0
    for shard in shards:
        path = folder / f"{shard}{STATS_SUFFIX}"
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
            # Counters a writer did not record count as zero: the page is for looking, not auditing.
            status.update(stats.get("status", {}))
            drops.update(stats.get("drops", {}))
            images += int(stats.get("images", 0))
            samples += int(stats.get("samples", 0))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise PreviewError(f"{path}: not a readable stats file ({type(exc).__name__}: {exc})") from exc
    return status, drops, images, samples


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ width: 400px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }}
.pics {{ display: flex; gap: 8px; align-items: flex-start; }}
.pics img {{ max-width: 256px; }}
.subject {{ background: repeating-conic-gradient(#ccc 0 25%, #fff 0 50%) 0 0 / 16px 16px;
  width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; }}
.card p {{ margin: 4px 0; }} .key, .scores {{ color: #555; font-size: 12px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td {{ padding: 1px 10px 1px 0; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
{drops}
<div class="grid">
{cards}
</div>
{problems}
</body></html>
"""


def build_page(folder: Path, limit: int) -> tuple[str, int]:
    """The contact sheet of up to `limit` samples of the mined `folder`; returns (html, samples shown).

    Raises:
        PreviewError: the folder holds no committed shard, or a committed file cannot be read.
    """
    shards = committed_shards(folder)
    if not shards:
        raise PreviewError(f"{folder}: holds no committed shard (no *{STATS_SUFFIX}); mine into it first")
    status, drops, images, samples = run_totals(folder, shards)
    cards: list[str] = []
    problems: list[str] = []
    tags_of: dict[str, dict[str, list[str]]] = {}
    for shard, raw in iter_samples(folder, shards):
        if len(cards) >= limit:
            break
        try:
            q = decode_sample(raw)
        except ValueError as exc:
            problems.append(f"<li>{html.escape(shard)}: {html.escape(str(exc))}</li>")
            continue
        if shard not in tags_of:
            tags_of[shard] = image_tags(folder, shard)
        cards.append(card(q, tags_of[shard].get(q.meta.source_id, [])))
    summary = (
        f"{len(shards)} committed shard(s), {images} image(s) "
        f"({', '.join(f'{k} {v}' for k, v in sorted(status.items()))}), {samples} sample(s); "
        f"showing {len(cards)}. Tinted: the mask; outline: the box; right: the subject cut-out."
    )
    drop_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    page = PAGE.format(
        title=html.escape(f"lar-gen mined samples: {folder.name or folder}"),
        summary=html.escape(summary),
        drops=f"<table><tr><th>drop reason</th><th>count</th></tr>{drop_rows}</table>" if drop_rows else "",
        cards="\n".join(cards),
        problems=f"<h2>Samples that do not decode</h2><ul>{''.join(problems)}</ul>" if problems else "",
    )
    return page, len(cards)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under a hidden temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataengine.preview", description="Write an HTML contact sheet of a mined output folder."
    )
    parser.add_argument("folder", metavar="OUT", help="a mined output folder (committed shards)")
    parser.add_argument("--limit", type=int, default=48, help="samples to show (default 48)")
    parser.add_argument("--out", help=f"the HTML file to write (default OUT/{PREVIEW_NAME})")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"argument --limit: must be at least 1, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 with one `error:` line for bad input)."""
    args = parse_args(argv)
    folder = Path(args.folder)
    out = Path(args.out) if args.out else folder / PREVIEW_NAME
    try:
        if not folder.is_dir():
            raise PreviewError(f"OUT {str(folder)!r} is not a folder" if folder.exists() else f"OUT {str(folder)!r} does not exist")
        if out.is_dir():
            raise PreviewError(f"--out {str(out)!r} is a folder; give a file name")
        if not out.parent.is_dir():
            raise PreviewError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")
        page, shown = build_page(folder, args.limit)
        try:
            write_atomic(out, page)
        except OSError as exc:
            raise PreviewError(f"--out {str(out)!r}: cannot write: {exc.strerror or exc}") from exc
    except PreviewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({shown} sample(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
