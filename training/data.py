"""Stream quadruplet shards (format v1) into training batches: webdataset reading, augmentation, resumable position.

`QuadrupletStream` is a torch `IterableDataset` that yields ready batches. Per worker it reads
tar shards (local paths, brace patterns, any fsspec URL) with webdataset's tar iterators, either
resampled with replacement (infinite; the multi-GPU default) or in seeded epochs, splits them
over nodes (accelerate processes) and DataLoader workers, shuffles through a buffer, decodes each
sample like `dataengine.schema.decode_sample` (mask stays L, subject stays RGBA; the source JPEG
is decoded later, at the reduced scale its zoom crop allows) and turns it into
model inputs: zoom-in crop around the instance, mask augmentation (precise / box / dilated), the
pipeline's own subject preprocessing (`inference.subject.prepare_subject`), caption tokenisation
and condition dropout. A broken sample is skipped and counted by reason, never fatal.

Exact resume: every random choice is a function of (seed, stream role, raw position), never of
wall-clock or worker start order, so a stream restarted with `LoaderState` (how many raw samples
each worker consumed, and which worker the next batch comes from) yields exactly the batches an
uninterrupted run would have yielded next. The DataLoader must be built by `make_dataloader`
(batch_size=None, workers take batches round-robin) and must not be wrapped by
`accelerator.prepare` (which would re-dispatch the batches).
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import Any
from urllib.parse import urlparse

import cv2
import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from dataengine.schema import Quadruplet, decode_sample
from inference.subject import chw_uint8, pixels_to_unit_range, prepare_subject
from inference.zoom import crop_resize, mask_box, zoom_box
from training.config import DataConfig

logger = logging.getLogger(__name__)

# OpenCV without its own thread pool: the loader's images are small and its DataLoader workers
# already use the cores; and a pool started in a parent process deadlocks the workers forked
# from it at their first cv2 call.
cv2.setNumThreads(1)

# Skip-counter reasons.
SKIP_DECODE = "decode"  # a member is missing, does not decode, or breaks the format contract
SKIP_TAR = "tar"  # the tar stream itself is unreadable (truncated, not a tar, cannot open)
SKIP_EMPTY_MASK = "empty_mask"  # nothing to inpaint
SKIP_PREPROCESS = "preprocess"  # anything else that failed while building the model inputs


GLOB_CHARS = re.compile(r"[*?\\[]")
WARN_FIRST = 5  # full warnings of one kind before they are summarised
WARN_INTERVAL_S = 60.0  # at most one summary line per kind per interval
MAX_MESSAGE = 300  # characters of an exception shown in a warning
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # len 1: a Windows drive letter


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_shards(shards: list[str] | str) -> list[str]:
    """Expand brace patterns (`{000000..000009}.tar`), `::`-joined lists and globs (`*.tar`) into shard URLs.

    Globs are matched now (local paths, and fsspec URLs through their filesystem), sorted; a glob
    that matches nothing contributes nothing.

    Raises:
        ValueError: nothing is left after expansion.
    """
    items = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(item):
            if not GLOB_CHARS.search(url):
                urls.append(url)
            elif _is_local(url):
                prefix = "file://" if url.startswith("file://") else ""
                urls += [prefix + m for m in sorted(glob.glob(_local_path(url)))]
            else:
                fs, _, paths = fsspec.get_fs_token_paths(url)
                urls += sorted(fs.unstrip_protocol(p) for p in paths)
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    return urls


def open_shard(url: str):
    """Open a shard for streaming: a local path or `file://` directly, any other scheme through fsspec."""
    if _is_local(url):
        return open(_local_path(url), "rb")  # noqa: SIM115
    return fsspec.open(url, "rb").open()


def describe_error(exn: BaseException) -> str:
    """`Type: first line of the message`, shortened: what a log line or an error message shows of an exception."""
    text = str(exn.args[0]) if isinstance(exn, OSError | tarfile.TarError) and exn.args else str(exn)
    if isinstance(exn, OSError) and exn.strerror:
        text = exn.strerror
    line = (text.strip().splitlines() or [""])[0].split(" @ <")[0]  # webdataset appends " @ <stream repr>"
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 3] + "..."
    return f"{type(exn).__name__}: {line}" if line else type(exn).__name__


def probe_shard(url: str, opener: Callable[[str], Any] = open_shard) -> str | None:
    """Why `url` cannot be a shard (missing, a folder, unreadable, not a tar, empty), or None when it starts well.

    Reads only the first tar header (512 bytes), so it is cheap enough to run on every local
    shard before training.
    """
    if _is_local(url):
        path = _local_path(url)
        if not os.path.exists(path):
            return "does not exist"
        if os.path.isdir(path):
            return "is a folder, not a tar file"
    try:
        with opener(url) as stream:
            head = stream.read(tarfile.BLOCKSIZE)
    except Exception as exn:  # any opener failure (OSError, a missing fsspec backend, ...) is the answer
        return f"cannot be read ({describe_error(exn)})"
    if not head:
        return "is empty"
    if head.startswith(COMPRESSED_MAGIC):
        return None  # a compressed tar (webdataset reads them with "r|*"): the stream itself will tell
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:
        return "is an empty tar (no member)"
    except tarfile.HeaderError:
        return "is not a tar file"
    return None


class ShardError(ValueError):
    """No shard of a shard list can be read; the message names the list and why."""


def check_shards(shards: list[str] | str, what: str = "data.shards", remote_probes: int = 3,
                 opener: Callable[[str], Any] = open_shard) -> list[str]:
    """Resolve a shard list and keep the shards that can be read; fail before training when none can.

    Every local shard is probed (`probe_shard`); remote ones (fsspec URLs) are probed until one
    reads, at most `remote_probes` of them, and the rest are trusted (a remote shard that fails
    later is counted by the loader like any broken stream). Unreadable shards are left out with
    one warning.

    Returns:
        The shard URLs to train on.

    Raises:
        ShardError: the list expands to nothing, or no probed shard can be read.
    """
    try:
        urls = expand_shards(shards)
    except ValueError:
        raise ShardError(f"{what} {_shown(shards)}: matches no shard") from None
    except Exception as exn:  # e.g. an fsspec glob on a backend that is not installed
        raise ShardError(f"{what} {_shown(shards)}: cannot list the shards ({describe_error(exn)})") from None
    bad: dict[str, str] = {}
    remote_ok, remote_tried = False, 0
    for url in urls:
        if not _is_local(url):
            if remote_ok or remote_tried >= remote_probes:
                continue
            remote_tried += 1
        reason = probe_shard(url, opener)
        if reason is None:
            remote_ok = remote_ok or not _is_local(url)
        else:
            bad[url] = reason
    good = [u for u in urls if u not in bad]
    if not remote_ok and not any(_is_local(u) for u in good):  # nothing was shown to be readable
        first, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        hint = ""
        if reason == "does not exist" and "{" in str(shards):
            hint = "; check the pattern against the file names (`make shards` writes train-000000.tar ...)"
        raise ShardError(
            f"{what} {_shown(shards)}: no readable shard among {len(urls)}: {first} {reason}{more}{hint}"
        )
    if bad:
        first, reason = next(iter(bad.items()))
        logger.warning("%s: leaving out %d of %d shard(s) that cannot be read, e.g. %s %s",
                       what, len(bad), len(urls), first, reason)
    return good


def _shown(shards: list[str] | str) -> str:
    return repr(shards[0]) if isinstance(shards, list) and len(shards) == 1 else repr(shards)


class WarningLimiter:
    """Rate-limited warnings: the first `first` of each kind in full, then at most one summary per `interval` s.

    A data stream can fail thousands of times a second (a missing shard drawn again and again);
    this bounds what it writes to the log whatever the failure mode.
    """

    def __init__(self, log: logging.Logger, first: int = WARN_FIRST, interval: float = WARN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.first, self.interval, self.clock = log, first, interval, clock
        self.counts: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()
        self.last: dict[str, float] = {}

    def warn(self, kind: str, message: str) -> None:
        """Log `message` (one line) as a warning of `kind`, or count it for the next summary."""
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= self.first:
            tail = f" (more {kind} warnings are summarised, at most one line per {self.interval:.0f} s)" \
                if n == self.first else ""
            self.log.warning("%s%s", message, tail)
            self.last[kind] = self.clock()
            return
        self.pending[kind] += 1
        now = self.clock()
        if now - self.last[kind] >= self.interval:
            self.log.warning("%d more %s warning(s) (%d in all); the latest: %s", self.pending[kind], kind, n, message)
            self.pending[kind] = 0
            self.last[kind] = now


class FailureTracker:
    """Counts failures by reason and in a row for one stream; stops it after `limit` failures in a row.

    A failure is a sample that cannot be used or a shard stream that yields nothing usable (cannot
    be opened, is not a tar, is truncated, is empty); a built sample resets the run. So a stream
    whose shards are all missing or broken stops after `limit` attempts instead of looping.
    """

    def __init__(self, limit: int, skipped: Counter, warnings: WarningLimiter):
        self.limit, self.skipped, self.warnings = limit, skipped, warnings
        self.in_a_row = 0
        self.last = ""

    def fail(self, reason: str, message: str, defer: bool = False) -> None:
        """Record one failure.

        Args:
            defer: only record; the caller raises with `check()` later. For webdataset's error
                handlers, whose exceptions webdataset's own handler would catch and swallow.

        Raises:
            NoSamplesError: `limit` failures in a row (unless deferred).
        """
        self.skipped[reason] += 1
        self.in_a_row += 1
        self.last = message
        self.warnings.warn(reason, message)
        if not defer:
            self.check()

    def check(self) -> None:
        """Raise NoSamplesError when `limit` failures in a row have been recorded."""
        if self.in_a_row >= self.limit:
            raise NoSamplesError(
                f"{self.in_a_row} shards/samples in a row failed (data.max_consecutive_failures); "
                f"the last: {self.last}; skipped so far: {dict(self.skipped)}"
            )

    def ok(self) -> None:
        self.in_a_row = 0


@dataclass
class LoaderState:
    """Where a stream stands: raw samples consumed per worker role, the next role, skip counts per role.

    Saved in every checkpoint (one per process) so a resumed run continues the exact sequence.
    """

    num_workers: int = 0
    cursors: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    next_role: int = 0

    def update(self, batch: dict[str, Any]) -> None:
        """Record that `batch` (from `QuadrupletStream`) was consumed."""
        role = int(batch["__role__"])
        self.cursors[role] = int(batch["__cursor__"])
        self.skipped[role] = dict(batch["__skipped__"])
        self.next_role = (role + 1) % max(1, self.num_workers)

    def skipped_total(self) -> dict[str, int]:
        """Skip counts by reason, summed over the worker roles of this process."""
        total: Counter[str] = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return dict(total)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "cursors": {str(k): v for k, v in self.cursors.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "next_role": self.next_role,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoaderState:
        return cls(
            num_workers=int(data["num_workers"]),
            cursors={int(k): int(v) for k, v in data["cursors"].items()},
            skipped={int(k): {str(r): int(n) for r, n in v.items()} for k, v in data["skipped"].items()},
            next_role=int(data["next_role"]),
        )


class NoSamplesError(RuntimeError):
    """The stream cannot produce a sample: no shards for a worker, or every sample fails."""


class CaptionMissingError(NoSamplesError):
    """A sample has no caption of the kind `data.caption` asks for: the shards were mined with another
    `caption.mode`. It stops the stream (every sample of such shards lacks it) instead of being skipped."""


def caption_of(q: Quadruplet, kind: str) -> str:
    """The sample's `kind` caption (`regional` or `global`, `data.caption`).

    Raises:
        CaptionMissingError: the sample was mined without that caption.
    """
    text = q.meta.caption(kind, q.text)
    if text is None:
        mined = ", ".join(sorted(q.meta.captions or {"regional": ""})) or "none"
        raise CaptionMissingError(
            f"sample {q.key} has no {kind!r} caption (it holds: {mined}); mine with caption.mode: {kind} or both, "
            f"or set data.caption to one it holds"
        )
    return text


class EmptyMaskError(ValueError):
    """A sample's mask has nothing to inpaint (at the source or at the training resolution)."""


def augment_mask(mask: np.ndarray, cfg: DataConfig, rng: random.Random) -> tuple[np.ndarray, str]:
    """Pick the mask the model sees (precise / box / dilated) for a non-empty binary HxW uint8 mask (0/1).

    Returns:
        (new mask, 0/1 uint8, same shape; the mode name).
    """
    modes = ["precise", "box", "dilated"]
    weights = [cfg.mask.precise, cfg.mask.box, cfg.mask.dilated]
    mode = rng.choices(modes, weights=weights)[0]
    if mode == "box":
        x0, y0, x1, y1 = mask_box(mask, threshold=1)
        out = np.zeros_like(mask)
        out[y0:y1, x0:x1] = 1
        return out, mode
    if mode == "dilated":
        radius = max(1, round(rng.uniform(0.25, 1.0) * cfg.mask.max_dilation * mask.shape[0]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        return cv2.dilate(mask, kernel), mode
    return mask, mode


class SourceDecodeError(ValueError):
    """The source JPEG of a sample does not decode (counted as `decode`, like any undecodable member)."""


def decode_lazily(raw: dict[str, Any]) -> Quadruplet:
    """`dataengine.schema.decode_sample` for the loader: everything decoded and checked, except the source pixels.

    The source JPEG is only opened; the builder decodes it once it knows the crop, at the reduced
    scale the crop allows (`load_source` through `inference.zoom.crop_resize`): a multi-megapixel
    source is most of a sample's decode time, and a 512² crop of it rarely needs all of its pixels.

    Raises:
        ValueError: a field is missing, does not decode, or breaks the contract.
    """
    return decode_sample(raw, load_source=False)


def load_source(source: Image.Image, scale: int) -> Image.Image:
    """The lazily opened source JPEG, decoded at 1/`scale` of each side (ceil), or in full when `scale` is 1.

    Raises:
        SourceDecodeError: the JPEG data is truncated or corrupt.
    """
    w, h = source.size
    try:
        if scale > 1 and min(w, h) < scale:  # too thin for libjpeg's scaling: block means of the full decode
            source.load()
            source = source.reduce(scale)
        elif scale > 1:
            source.draft("RGB", (w // scale, h // scale))
        source.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise SourceDecodeError(f"source does not decode: {exc}") from exc
    expected = (-(-w // scale), -(-h // scale))
    if source.size != expected or source.mode != "RGB":
        raise SourceDecodeError(f"source decoded to {source.mode} {source.size}, expected RGB {expected}")
    return source


def crop_mask(mask: Image.Image, box: tuple[int, int, int, int], resolution: int) -> np.ndarray:
    """The `box` crop of the L mask at `resolution`² as 0/1 uint8 (nearest: the same pixels as PIL's NEAREST)."""
    # PIL's crop pads outside the image with 0 ("keep"), like `crop_resize`, and copies only the box.
    crop = cv2.resize(np.asarray(mask.crop(box)), (resolution, resolution), interpolation=cv2.INTER_NEAREST_EXACT)
    return (crop > 127).astype(np.uint8)


def _is_lazy(image: Image.Image) -> bool:
    """An opened RGB JPEG whose pixels are not decoded yet (from `decode_lazily`)."""
    # An ImageFile keeps its decoder `tile`s until load() has run them.
    return image.format == "JPEG" and image.mode == "RGB" and bool(getattr(image, "tile", None))


class TrainingExampleBuilder:
    """Turn one decoded quadruplet into model inputs (tensors), deterministically given an RNG.

    Args:
        cfg: the data section of the stage config.
        tokenizer: the pipeline's CLIP tokenizer (captions are padded to its model_max_length).
        clip_size: the image encoder's input size.
        refine_size: the RefineNet subject input size in pixels (the training resolution).
        image_processor: the pipeline's CLIPImageProcessor (normalisation for the image encoder).
        refine: build `refine_pixels` (RefineNet's subject input; stage 2 only). Without it the
            samples carry no `refine_pixels`, and the largest subject resize is skipped.
        tokenizer_2: SDXL's second tokenizer; when given, samples also carry `input_ids_2`.
    """

    @staticmethod
    def draw_dropout(dropout, rng) -> tuple[bool, bool]:
        """(drop_text, drop_image), each drawn independently with its configured probability."""
        return rng.random() < dropout.text, rng.random() < dropout.image

    def __init__(self, cfg: DataConfig, tokenizer, clip_size: int, refine_size: int, image_processor=None,
                 refine: bool = True, tokenizer_2=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.clip_size = clip_size
        self.refine_size = refine_size
        self.image_processor = image_processor
        self.refine = refine

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids (model_max_length,) of a caption; "" is the null text condition."""
        return self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids[0]

    def __call__(self, q: Quadruplet, rng: random.Random) -> dict[str, Any]:
        """Build the inputs of one sample.

        Returns:
            dict with pixel_values (3,R,R) uint8 (`pixels_to_unit_range` makes it [-1,1]), mask
            (1,R,R) uint8 0/1 (1 = inpaint; the masked image is pixel_values where mask is 0),
            clip_pixels, refine_pixels (uint8 like pixel_values; only with `refine`), input_ids (L,), drop_text,
            drop_image (bool tensors), mask_mode (str), key (str), crop_box (4,) long (the square
            crop in source pixels, possibly past the edges) and source_size (2,) long (w, h): the
            crop's real geometry, SDXL's micro-conditioning (`inference.sdxl.sdxl_time_ids`);
            input_ids_2 (L,) with `tokenizer_2`.

        Raises:
            EmptyMaskError: the mask is empty (counted as `empty_mask`).
        """
        res = self.cfg.resolution
        # The schema guarantees a 0/255 mask, so PIL's bounding box of non-zero pixels is the mask box.
        box = q.mask.getbbox()
        if box is None:
            raise EmptyMaskError(f"sample {q.key}: mask is empty: nothing to inpaint")
        # 1. Zoom-in crop: the instance box scaled by a random factor, made square, resized.
        w, h = q.source.size
        if rng.random() < self.cfg.zoom.probability:
            expansion = rng.uniform(self.cfg.zoom.min_expansion, self.cfg.zoom.max_expansion)
            crop = zoom_box(box, (w, h), expansion)
        else:  # the whole image, centred in a square
            side = max(w, h)
            x0, y0 = (w - side) // 2, (h - side) // 2
            crop = (x0, y0, x0 + side, y0 + side)
        # The pipeline's crop (`crop_resize`), with the source decoded only now, at the reduced JPEG
        # scale the crop allows; the box moves onto that scale's grid (by less than the scale in
        # px, far below the zoom's own randomness), and the mask is cut with the same box.
        lazy = partial(load_source, q.source) if _is_lazy(q.source) else None
        source, crop = crop_resize(q.source, crop, res, decode_reduced=lazy)
        mask_crop = crop_mask(q.mask, crop, res)
        if not mask_crop.any():  # a sliver that vanished when resized
            raise EmptyMaskError(f"sample {q.key}: the mask vanishes at {res}px")
        # 2. Mask augmentation.
        mask_aug, mode = augment_mask(mask_crop, self.cfg, rng)
        pixel_values = chw_uint8(source)
        mask_t = torch.from_numpy(mask_aug)[None]
        # 3. Subject preprocessing: the same function the pipeline uses.
        subject = prepare_subject(
            q.subject, clip_size=self.clip_size, refine_size=self.refine_size if self.refine else None,
            image_processor=self.image_processor, refine_uint8=True,
        )
        # 4. Condition dropout for CFG (paper 4.5): text and image are dropped independently.
        drop_text, drop_image = self.draw_dropout(self.cfg.dropout, rng)
        text = "" if drop_text else caption_of(q, self.cfg.caption)
        input_ids = self.tokenize(text)
        example = {
            "pixel_values": pixel_values,
            "mask": mask_t,
            "clip_pixels": subject.clip_pixels.float(),
            "input_ids": input_ids,
            "drop_text": torch.tensor(drop_text),
            "drop_image": torch.tensor(drop_image),
            "mask_mode": mode,
            "key": q.key,
            "crop_box": torch.tensor([int(v) for v in crop], dtype=torch.long),
            "source_size": torch.tensor([w, h], dtype=torch.long),
        }
        if self.tokenizer_2 is not None:
            example["input_ids_2"] = self.tokenizer_2(
                text, padding="max_length", max_length=self.tokenizer_2.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids[0]
        if self.refine:
            example["refine_pixels"] = subject.refine_pixels  # uint8, scaled on the trainer's device
        return example


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists."""
    out: dict[str, Any] = {}
    for name, value in samples[0].items():
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(value, torch.Tensor) else values
    return out


class QuadrupletStream(IterableDataset):
    """An infinite, resumable stream of training batches from quadruplet shards.

    Args:
        cfg: the data section (shards, resolution, batch size, shuffle, augmentation, dropout).
        builder: turns a decoded quadruplet into model inputs.
        seed: base seed; every random choice derives from it.
        rank, world_size: this process and the number of processes (node splitting).
        state: where to resume (None: from the start).
        shards: override `cfg.shards` (e.g. validation shards).

    Each yielded batch also carries `__role__` (the worker role), `__cursor__` (raw samples that
    role has consumed) and `__skipped__` (its skip counts by reason), for `LoaderState.update`.

    Raises (when iterated):
        NoSamplesError: a worker has no shard, or `max_consecutive_failures` samples in a row fail.
    """

    def __init__(
        self,
        cfg: DataConfig,
        builder: TrainingExampleBuilder,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: LoaderState | None = None,
        shards: list[str] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.builder = builder
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.urls = expand_shards(shards or cfg.shards)
        self.state = state or LoaderState(num_workers=max(1, cfg.num_workers))

    # ------------------------------------------------------------------ raw samples
    def _read_shard(self, url: str, failures: FailureTracker) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard; a stream that breaks or yields nothing counts as one `tar` failure."""
        failed = False
        produced = 0

        def on_tar_error(exn: Exception) -> bool:
            # One event per shard: the rest of a broken tar stream cannot be trusted.
            nonlocal failed
            if not failed:
                failed = True
                failures.fail(SKIP_TAR, f"unreadable tar stream {url}: {describe_error(exn)}", defer=True)
            return False

        def on_group_error(exn: Exception) -> bool:
            # e.g. a duplicate member name
            failures.fail(SKIP_DECODE, f"bad sample in {url}: {describe_error(exn)}", defer=True)
            return True

        try:
            stream = open_shard(url)
        except Exception as exn:  # missing, a folder, permission denied, an fsspec backend error...
            on_tar_error(exn)
            failures.check()
            return
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=on_tar_error)
            for sample in group_by_keys(files, handler=on_group_error):
                failures.check()
                produced += 1
                yield sample
        finally:
            stream.close()
        if produced == 0 and not failed:
            # An empty tar would otherwise be drawn again and again without any failure being counted.
            failures.fail(SKIP_TAR, f"shard {url} holds no sample", defer=True)
        failures.check()

    def _raw_samples(self, role: int, roles: int, failures: FailureTracker) -> Iterator[dict[str, Any]]:
        """Infinite raw samples for one global worker role (`role` of `roles` over all processes)."""
        if self.cfg.resampled:
            # Shards drawn with replacement, per-role seeded: roles see independent streams.
            rng = random.Random(f"{self.seed}:shards:{role}")
            while True:
                yield from self._read_shard(rng.choice(self.urls), failures)
        for epoch in count():
            order = list(self.urls)
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            produced = 0
            if len(order) >= roles:
                for url in order[role::roles]:
                    for sample in self._read_shard(url, failures):
                        produced += 1
                        yield sample
            else:  # fewer shards than roles: every role reads all, keeps every roles-th sample
                index = 0
                for url in order:
                    for sample in self._read_shard(url, failures):
                        if index % roles == role:
                            produced += 1
                            yield sample
                        index += 1
            if produced == 0:
                raise NoSamplesError(
                    f"worker role {role} of {roles} got no sample in a whole epoch over {len(order)} shard(s) "
                    f"(skipped: {dict(failures.skipped) or 'none'}); "
                    "use fewer workers/processes, more shards, or data.resampled=true"
                )

    # ------------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.state.num_workers:
            raise ValueError(
                f"the stream was set up for {self.state.num_workers} worker(s) but runs with {num_workers}; "
                "build the DataLoader with make_dataloader"
            )
        # Rotate roles so the first batch of a resumed loader comes from the role that was next.
        role = (worker_id + self.state.next_role) % num_workers
        global_role = self.rank * num_workers + role
        roles = self.world_size * num_workers
        skipped: Counter[str] = Counter(self.state.skipped.get(role, {}))
        failures = FailureTracker(self.cfg.max_consecutive_failures, skipped, WarningLimiter(logger))
        start = self.state.cursors.get(role, 0)
        shuffle_rng = random.Random(f"{self.seed}:shuffle:{global_role}")
        raw = self._raw_samples(global_role, roles, failures)
        stream = wds.filters._shuffle(
            raw, bufsize=self.cfg.shuffle_buffer, initial=min(self.cfg.shuffle_initial, self.cfg.shuffle_buffer),
            rng=shuffle_rng,
        )
        batch: list[dict[str, Any]] = []
        for position, raw_sample in enumerate(stream):
            if position < start:
                continue  # consumed before the checkpoint: skip without decoding
            rng = random.Random(f"{self.seed}:sample:{global_role}:{position}")
            try:
                quad = decode_lazily(raw_sample)
            except ValueError as exn:
                failures.fail(SKIP_DECODE, f"skipping a sample (decode): {describe_error(exn)}")
                continue
            try:
                example = self.builder(quad, rng)
            except CaptionMissingError:
                raise  # the shards cannot serve data.caption: skipping sample by sample would hide it
            except SourceDecodeError as exn:
                failures.fail(SKIP_DECODE, f"skipping a sample (decode): sample {quad.key}: {describe_error(exn)}")
                continue
            except EmptyMaskError as exn:
                failures.fail(SKIP_EMPTY_MASK, f"skipping a sample (empty_mask): {exn}")
                continue
            except Exception as exn:  # a per-sample failure must not end the run; counted and logged
                failures.fail(SKIP_PREPROCESS, f"skipping a sample (preprocess): {describe_error(exn)}")
                continue
            failures.ok()
            batch.append(example)
            if len(batch) == self.cfg.batch_size:
                out = collate(batch)
                out["__role__"] = role
                out["__cursor__"] = position + 1
                out["__skipped__"] = dict(skipped)
                yield out
                batch = []


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), the bound torch's DataLoader warns against exceeding."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_dataloader(stream: QuadrupletStream) -> DataLoader:
    """The DataLoader for a `QuadrupletStream`: batches are built in the workers (batch_size=None)."""
    workers = stream.cfg.num_workers
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )


def stop_workers(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's worker processes now.

    An iterator left to the garbage collector after an exception (its traceback keeps it alive)
    makes torch wait 5 s per worker before giving up on them; a failed run should end at once.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def read_quadruplets(shards: list[str], limit: int) -> list[Quadruplet]:
    """The first `limit` decodable quadruplets of `shards` in order (validation samples; broken ones skipped).

    Problems are logged through a `WarningLimiter`: a long list of missing shards, read again at
    every validation, says so in a few lines.
    """
    found: list[Quadruplet] = []
    warnings = WarningLimiter(logger)

    def on_error(exn: Exception) -> bool:
        warnings.warn("validation", f"validation: skipping a broken part of {url}: {describe_error(exn)}")
        return True

    for url in expand_shards(shards):
        try:
            with open_shard(url) as stream:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
                for raw in group_by_keys(files, handler=on_error):
                    try:
                        found.append(decode_sample(raw))
                    except ValueError as exn:
                        warnings.warn("validation", f"validation: skipping {describe_error(exn)}")
                    if len(found) >= limit:
                        return found
        except (OSError, tarfile.TarError) as exn:
            warnings.warn("validation", f"validation: cannot read {url}: {describe_error(exn)}")
    return found


__all__ = [
    "EmptyMaskError",
    "LoaderState",
    "NoSamplesError",
    "QuadrupletStream",
    "TrainingExampleBuilder",
    "FailureTracker",
    "ShardError",
    "WarningLimiter",
    "SourceDecodeError",
    "augment_mask",
    "crop_mask",
    "decode_lazily",
    "load_source",
    "available_cpus",
    "check_shards",
    "collate",
    "describe_error",
    "expand_shards",
    "make_dataloader",
    "open_shard",
    "pixels_to_unit_range",
    "probe_shard",
    "read_quadruplets",
    "stop_workers",
]
