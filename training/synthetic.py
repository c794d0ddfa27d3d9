"""Synthetic format-v1 quadruplet shards whose conditions are informative, for tests, benchmarks and smoke runs.

Three tasks, chosen with `write_synthetic_shards(..., task=...)`:

- "object" (the default; the loader and trainer tests use it): a grey noisy scene with one
  coloured object (ellipse or box); the mask is the object, the subject image is its RGBA crop and
  the caption names its colour and a noun, e.g. "a red cup".
- "colour": built for the stage-1 learning check (`training.learning_check`). The hole is a large
  square (56-75 % of the side) filled with one of eight saturated colours; the caption names the
  colour, three times ("cyan: a cyan cup, cyan all over"), and the subject image shows it, while the scene around the hole (a random grey level, a random
  gradient and pixel noise) is drawn independently of it. Both conditions therefore carry the
  same information, all of it, and the context carries none: a model that reads either condition
  can predict the hole, one that reads neither cannot.
- "pattern": built for the stage-2 (Refine) check. The hole is a per-sample random grid of
  `PATTERN_CELLS` x `PATTERN_CELLS` black or white cells; the caption is the same for every sample
  ("a black and white {noun}"), so only the subject image tells one hole from another, and only
  through its spatial layout: the palette is the same for every sample.

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
# The "colour" task's palette: the corners of the RGB cube, as far apart as colours get, so that
# the hole's latents differ strongly between captions.
SATURATED: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 210, 25),
    "blue": (25, 25, 230),
    "yellow": (235, 225, 25),
    "magenta": (225, 25, 225),
    "cyan": (25, 220, 230),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
NOUNS = ("cup", "car", "dog", "cat", "chair", "bottle")
TASKS = ("object", "colour", "pattern")
# Cells per side of the "pattern" task's random black/white grid. Two: at the learning check's 16 px
# the latent is 2 x 2, so one cell per latent position is the finest detail the loss can show.
PATTERN_CELLS = 2
# The square holes' corners and sides are multiples of this, so that the loader's crop of the hole
# (`inference.zoom.crop_resize` snaps a crop box to the grid of the JPEG's reduced decoding scale, 2
# for these holes at the checks' 16 px) is the hole exactly, with no rim of scene around it.
HOLE_GRID = 4


def _meta(seed: int, index: int, size: int, box: tuple[int, int, int, int], tag: str, mask: Image.Image,
          task: str) -> tuple[str, SampleMeta]:
    # The "object" task keeps its original ids and URIs (its keys predate the other tasks).
    name = f"{seed}:{index}" if task == "object" else f"{task}:{seed}:{index}"
    source_id = hashlib.sha256(f"synthetic:{name}".encode()).hexdigest()[:16]
    area = float(np.asarray(mask).astype(bool).mean())
    meta = SampleMeta(
        source_id=source_id, instance=0, uri=f"synthetic://{name.replace(':', '/')}", width=size, height=size, tag=tag,
        box_xyxy=[float(v) for v in box], box_score=1.0, text_score=1.0, mask_score=1.0,
        mask_area_frac=area, models={"generator": "training.synthetic"}, pipeline="synthetic", config_hash="synthetic",
    )
    return source_id, meta


def synthetic_quadruplet(index: int, size: int = 64, seed: int = 0, task: str = "object") -> Quadruplet:
    """One synthetic quadruplet of `task` (see the module docstring); deterministic in `index`, `seed` and `task`.

    Raises:
        ValueError: unknown task.
    """
    if task == "object":
        return _object_quadruplet(index, size, seed)
    if task in ("colour", "pattern"):
        return _square_hole_quadruplet(index, size, seed, task)
    raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")


def _object_quadruplet(index: int, size: int, seed: int) -> Quadruplet:
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
    source_id, meta = _meta(seed, index, size, box, noun, mask, "object")
    return Quadruplet(
        key=sample_key(source_id, 0), source=source, mask=mask, subject=subject,
        text=f"a {colour_name} {noun}", meta=meta,
    )


def _square_hole_quadruplet(index: int, size: int, seed: int, task: str) -> Quadruplet:
    rng = random.Random(f"synthetic:{task}:{seed}:{index}")
    nprng = np.random.default_rng(rng.getrandbits(32))
    noun = rng.choice(NOUNS)
    # The scene: a random grey level, a random linear gradient and pixel noise, all independent of
    # the hole, so the context says nothing about what the hole holds.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    gx, gy = nprng.uniform(-60, 60, 2)
    grey = nprng.uniform(70, 185) + gx * xx + gy * yy
    scene = np.clip(grey[..., None] + nprng.normal(0, 10, (size, size, 3)), 0, 255)
    if task == "colour":
        # A large hole (56-75 % of the side), so that with a tight zoom-in it fills most of the crop.
        side = HOLE_GRID * rng.randint(size * 9 // 16 // HOLE_GRID, size * 3 // 4 // HOLE_GRID)
        name = rng.choice(list(SATURATED))
        fill = np.broadcast_to(np.array(SATURATED[name], np.float32), (side, side, 3))
        # The colour word three times: one word moves the tiny text encoder's output only a little
        # (the other tokens dominate it); repeated, it carries ~2x more of the caption's variance.
        text = f"{name}: a {name} {noun}, {name} all over"
    else:
        # At most 24 px, so that the subject square (the hole padded to 1.02x its side, rounded)
        # is the hole itself and its pattern lines up with the hole's when both are resized.
        side = rng.choice((16, 20, 24))  # each a multiple of PATTERN_CELLS
        cells = nprng.integers(0, 2, (PATTERN_CELLS, PATTERN_CELLS))
        bits = np.kron(cells, np.ones((side // PATTERN_CELLS, side // PATTERN_CELLS)))
        fill = np.where(bits[..., None] > 0, 245.0, 10.0) * np.ones(3, np.float32)
        text = f"a black and white {noun}"
    x0, y0 = (HOLE_GRID * rng.randint(0, (size - side) // HOLE_GRID) for _ in range(2))
    box = (x0, y0, x0 + side, y0 + side)
    scene[y0 : y0 + side, x0 : x0 + side] = fill
    source = Image.fromarray(np.rint(scene).astype(np.uint8), mode="RGB")
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    # The subject is exactly the hole (no margin), so it holds the hole's content and nothing else.
    subject = source.crop(box).convert("RGBA")
    subject.putalpha(mask.crop(box))
    source_id, meta = _meta(seed, index, size, box, noun, mask, task)
    return Quadruplet(key=sample_key(source_id, 0), source=source, mask=mask, subject=subject, text=text, meta=meta)


def write_synthetic_shards(
    out_dir: str | Path, num_shards: int, samples_per_shard: int, size: int = 64, seed: int = 0,
    task: str = "object",
) -> list[str]:
    """Write `{shard:06d}.tar` shards of synthetic quadruplets of `task` (temp name, then rename).

    Returns:
        The shard paths, in order.

    Raises:
        ValueError: unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        final = out / f"{shard:06d}.tar"
        tmp = out / f".{shard:06d}.tar.tmp-{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for i in range(samples_per_shard):
                sink.write(encode_sample(synthetic_quadruplet(shard * samples_per_shard + i, size, seed, task)))
        os.replace(tmp, final)
        paths.append(str(final))
    return paths
