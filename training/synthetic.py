"""Synthetic format-v1 quadruplet shards whose conditions are informative, for tests, benchmarks and smoke runs.

Each sample is a grey noisy scene with one coloured object (ellipse or box); the mask is the
object, the subject image is its RGBA crop and the caption names its colour and a noun, e.g.
"a red cup". The colour inside the hole can only be recovered from the caption or the subject,
so a model that uses its conditions reaches a lower loss than one fed shuffled conditions.
Samples go through `dataengine.schema.encode_sample`, exactly like the engine's output.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from dataengine.schema import Quadruplet, SampleMeta, encode_sample, sample_key

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 225),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
NOUNS = ("cup", "car", "dog", "cat", "chair", "bottle")


def synthetic_quadruplet(index: int, size: int = 64, seed: int = 0) -> Quadruplet:
    """One synthetic quadruplet (deterministic in `index` and `seed`)."""
    rng = random.Random(f"synthetic:{seed}:{index}")
    nprng = np.random.default_rng(rng.getrandbits(32))
    colour_name = rng.choice(list(COLOURS))
    noun = rng.choice(NOUNS)
    grey = nprng.integers(90, 170)
    scene = np.clip(grey + nprng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    source = Image.fromarray(scene, mode="RGB")
    side = rng.randint(size * 3 // 10, size // 2)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.5:
        draw.ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    else:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    source.paste(Image.new("RGB", (size, size), COLOURS[colour_name]), (0, 0), mask)
    margin = max(1, side // 10)
    crop = (max(0, box[0] - margin), max(0, box[1] - margin), min(size, box[2] + margin), min(size, box[3] + margin))
    subject = source.crop(crop).convert("RGBA")
    subject.putalpha(mask.crop(crop))
    source_id = hashlib.sha256(f"synthetic:{seed}:{index}".encode()).hexdigest()[:16]
    area = float(np.asarray(mask).astype(bool).mean())
    meta = SampleMeta(
        source_id=source_id, instance=0, uri=f"synthetic://{seed}/{index}", width=size, height=size, tag=noun,
        box_xyxy=[float(v) for v in box], box_score=1.0, text_score=1.0, mask_score=1.0,
        mask_area_frac=area, models={"generator": "training.synthetic"}, pipeline="synthetic", config_hash="synthetic",
    )
    return Quadruplet(
        key=sample_key(source_id, 0), source=source, mask=mask, subject=subject,
        text=f"a {colour_name} {noun}", meta=meta,
    )


def write_synthetic_shards(
    out_dir: str | Path, num_shards: int, samples_per_shard: int, size: int = 64, seed: int = 0
) -> list[str]:
    """Write `{shard:06d}.tar` shards of synthetic quadruplets (temp name, then rename).

    Returns:
        The shard paths, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        final = out / f"{shard:06d}.tar"
        tmp = out / f".{shard:06d}.tar.tmp-{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for i in range(samples_per_shard):
                sink.write(encode_sample(synthetic_quadruplet(shard * samples_per_shard + i, size, seed)))
        os.replace(tmp, final)
        paths.append(str(final))
    return paths
