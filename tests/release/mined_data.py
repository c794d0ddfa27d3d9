"""Format-v1 mined folders for the release tests, written directly (not by the engine).

The folders look like the engine's output (docs/data-format.md, "A mined output folder"): per
shard a tar written with `webdataset.TarWriter` from `dataengine.schema.encode_sample`, a parquet
of per-image statuses, and a `_stats.json` written last (the completion marker).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw

from dataengine.schema import Quadruplet, SampleMeta, encode_sample, sample_key, source_id_from_bytes

TAGS = ("dog", "cat", "chair", "bicycle", "cup", "lamp")
MODELS = {
    "tagger": "tiny/clip-tagger",
    "grounding": "tiny/grounding-dino",
    "segmenter": "tiny/sam",
    "captioner": "tiny/llava",
}


def make_source(index: int) -> tuple[Image.Image, bytes]:
    """A small deterministic RGB scene and its JPEG bytes (the mined "input image")."""
    rng = np.random.default_rng(index)
    w, h = int(rng.integers(48, 97)), int(rng.integers(40, 81))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return img, buf.getvalue()


def make_instances(index: int) -> list[Quadruplet]:
    """One to four quadruplets (instances) of source image `index`, tags cycling through TAGS."""
    source, raw = make_source(index)
    source_id = source_id_from_bytes(raw)
    rng = np.random.default_rng(1000 + index)
    w, h = source.size
    out = []
    for inst in range(1 + index % 4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = int(rng.integers(x0 + 8, w + 1)), int(rng.integers(y0 + 8, h + 1))
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
        subject = source.crop((x0, y0, x1, y1)).convert("RGBA")
        subject.putalpha(mask.crop((x0, y0, x1, y1)))
        tag = TAGS[(index + inst) % len(TAGS)]
        area = float((np.asarray(mask) > 0).mean())
        meta = SampleMeta(
            source_id=source_id,
            instance=inst,
            uri=f"images/{index:04d}.jpg",
            width=w,
            height=h,
            tag=tag,
            box_xyxy=[float(x0), float(y0), float(x1), float(y1)],
            box_score=float(rng.uniform(0.3, 0.9)),
            text_score=float(rng.uniform(0.2, 0.8)),
            mask_score=float(rng.uniform(0.5, 1.0)),
            mask_area_frac=area,
            models=MODELS,
            pipeline="fixture",
            config_hash="0123456789abcdef",
        )
        caption = f"a {'small ' * int(rng.integers(0, 4))}{tag} in a noisy picture number {index}"
        out.append(Quadruplet(sample_key(source_id, inst), source, mask, subject, caption, meta))
    return out


def write_mined_shard(
    folder: Path, shard: int, samples: list[dict], images: list[dict], commit: bool = True
) -> Path:
    """Write one mined shard: tar, then parquet, then (if `commit`) the `_stats.json` marker."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / f"{shard:06d}.tar"
    with wds.TarWriter(str(tar)) as sink:
        for sample in samples:
            sink.write(sample)
    pq.write_table(pa.Table.from_pylist(images), folder / f"{shard:06d}.parquet")
    if commit:
        stats = {
            "images": len(images),
            "samples": len(samples),
            "dropped": {"too_small": 2, "low_mask_score": 1},
            "seconds": {"ground": 0.5, "segment": 0.25},
        }
        (folder / f"{shard:06d}_stats.json").write_text(json.dumps(stats))
    return tar


def mined_shard(folder: Path, shard: int, sources: range | list[int], commit: bool = True) -> Path:
    """A mined shard holding every instance of the given source image indices."""
    samples, images = [], []
    for index in sources:
        quads = make_instances(index)
        samples += [encode_sample(q) for q in quads]
        images.append(
            {"uri": f"images/{index:04d}.jpg", "status": "ok", "error": "", "instances": len(quads)}
        )
    images.append({"uri": "images/blank.jpg", "status": "no_instances", "error": "", "instances": 0})
    return write_mined_shard(folder, shard, samples, images, commit=commit)


def expected_keys(sources: list[int] | range) -> set[str]:
    """The sample keys of the given source image indices."""
    return {q.key for i in sources for q in make_instances(i)}
