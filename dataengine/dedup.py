"""Near-duplicate source images across a whole mining run (perceptual hashes, `dedup:` in the config).

The rule, the same whatever the order in which Ray finishes shards, their parallelism, or a resume:

- images are taken in **input order** (shard index, then position in the shard: the order
  `dataengine.inputs.plan_shards` lists them);
- an image whose bytes equal an earlier image's (same `source_id`) is a duplicate of the first of
  them (`duplicate_source`);
- otherwise an image whose pHash (64 bits, of the decoded upright source) is within
  `dedup.max_distance` bits (Hamming) of an earlier **kept** image's is a near duplicate of the
  first such image (`near_duplicate`); a duplicate is never itself a reference, so what counts as
  a duplicate depends only on the images before it;
- duplicates are not mined: their parquet row says `no_instances`, `duplicate_of` holds the
  `source_id` of the image they duplicate, `error` names it.

Every decision needs the hashes of all earlier images, so the engine hashes the pending shards in a
short pass before mining (in parallel: Ray tasks, or in process with the local backend) and takes
the hashes of committed shards from their parquet (`phash`, `source_id`): a resumed run decides
exactly as an uninterrupted one. The pass reads each image once more than mining does (decoding
is a small share of a model stage's time per image; `docs/data-engine.md` "Near duplicates").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import imagehash
from PIL import Image

from dataengine.config import RunConfig
from dataengine.images import ImageDecodeError, decode_image
from dataengine.inputs import InputItem, InputShard, read_bytes
from dataengine.schema import source_id_from_bytes

HASH_BITS = 64  # imagehash.phash with hash_size=8


@dataclass(frozen=True)
class HashedImage:
    """One input image as the dedup pass sees it ("" where the bytes or pixels could not be had)."""

    uri: str
    source_id: str
    phash: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Duplicate:
    """Why an image is not mined: it repeats `of` (a `source_id`), found at `of_uri`."""

    reason: str  # duplicate_source | near_duplicate
    of: str
    of_uri: str
    distance: int

    def detail(self) -> str:
        """The parquet row's error text."""
        if self.reason == "duplicate_source":
            return f"dedup: same bytes as {self.of} ({self.of_uri})"
        return f"dedup: near duplicate of {self.of} ({self.of_uri}), pHash distance {self.distance}"


def phash_of(image: Image.Image) -> str:
    """The 64-bit perceptual hash (DCT of the 32x32 grey image) as 16 hex digits."""
    return str(imagehash.phash(image))


def hash_item(item: InputItem, cfg: RunConfig) -> HashedImage:
    """Read and decode one input as the read stage does (same limits, same upright size-capped pixels) and hash it."""
    start = time.perf_counter()
    try:
        data = read_bytes(item)
    except (OSError, ValueError):
        return HashedImage(item.uri, "", "", time.perf_counter() - start)
    source_id = source_id_from_bytes(data) if data else ""
    limits = cfg.pipeline.limits
    try:
        pixels = decode_image(
            data, max_pixels=limits.max_pixels, max_side=cfg.pipeline.output.max_side, min_side=limits.min_side,
            max_bytes=limits.max_bytes,
        )  # fmt: skip
    except ImageDecodeError:
        return HashedImage(item.uri, source_id, "", time.perf_counter() - start)
    return HashedImage(item.uri, source_id, phash_of(Image.fromarray(pixels)), time.perf_counter() - start)


def hash_shard(shard: InputShard, cfg: RunConfig) -> list[HashedImage]:
    """Every image of one input shard, hashed, in shard order."""
    return [hash_item(item, cfg) for item in shard.items]


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class _HashIndex:
    """Kept hashes, found within a Hamming radius without comparing against all of them.

    The 64 bits are cut into `radius + 1` blocks: two hashes at most `radius` bits apart agree
    exactly on at least one block (pigeonhole), so only hashes sharing a block are compared.
    """

    def __init__(self, radius: int):
        self.radius = radius
        n = radius + 1
        edges = [HASH_BITS * i // n for i in range(n + 1)]
        self.blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.table: dict[tuple[int, int], list[int]] = {}
        self.values: list[int] = []

    def add(self, value: int) -> None:
        slot = len(self.values)
        self.values.append(value)
        for b, (shift, mask) in enumerate(self.blocks):
            self.table.setdefault((b, (value >> shift) & mask), []).append(slot)

    def first_within(self, value: int) -> tuple[int, int] | None:
        """(slot, distance) of the earliest added hash within the radius, or None."""
        best: tuple[int, int] | None = None
        for b, (shift, mask) in enumerate(self.blocks):
            for slot in self.table.get((b, (value >> shift) & mask), ()):
                if best is not None and slot >= best[0]:
                    break  # slots are in insertion order: later ones cannot win
                distance = (self.values[slot] ^ value).bit_count()
                if distance <= self.radius:
                    best = (slot, distance)
                    break
        return best


def find_duplicates(images: Iterable[HashedImage], max_distance: int) -> dict[int, Duplicate]:
    """Apply the module's rule to images given in input order.

    Args:
        images: every image of the run in input order (committed shards too).
        max_distance: `dedup.max_distance`.

    Returns:
        {position in `images`: Duplicate} for the images not to mine.
    """
    exact: dict[str, int] = {}
    index = _HashIndex(max_distance)
    kept: list[int] = []  # index slot -> position
    listed: list[HashedImage] = []
    found: dict[int, Duplicate] = {}
    for position, image in enumerate(images):
        listed.append(image)
        if image.source_id and image.source_id in exact:
            first = listed[exact[image.source_id]]
            found[position] = Duplicate("duplicate_source", first.source_id, first.uri, 0)
            continue
        if image.source_id:
            exact[image.source_id] = position
        if not image.phash:
            continue  # unreadable: the read stage records why
        value = int(image.phash, 16)
        hit = index.first_within(value)
        if hit is not None:
            first = listed[kept[hit[0]]]
            found[position] = Duplicate("near_duplicate", first.source_id, first.uri, hit[1])
            continue
        index.add(value)
        kept.append(position)
    return found


def plan_duplicates(
    shards: Sequence[InputShard], hashed: dict[int, list[HashedImage]], max_distance: int
) -> dict[tuple[int, int], tuple[HashedImage, Duplicate | None]]:
    """Each image's hash and duplicate decision, by (shard index, position), over all `shards`.

    Args:
        shards: every shard of the run, in input order.
        hashed: the hashed images of every shard, by shard index (from the pass or a parquet).
        max_distance: `dedup.max_distance`.
    """
    order = [(s.index, i) for s in shards for i in range(len(hashed[s.index]))]
    flat = [hashed[s][i] for s, i in order]
    duplicates = find_duplicates(flat, max_distance)
    return {where: (flat[n], duplicates.get(n)) for n, where in enumerate(order)}
