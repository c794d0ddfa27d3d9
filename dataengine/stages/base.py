"""What flows between the data-engine stages, and the base class every stage derives from.

The unit of work is one input shard: a batch is Ray Data's numpy batch format with a `shard`
column and a `records` column, each record list holding one `ImageRecord` per input image of that
shard. A stage walks the records of each shard in fixed chunks of its `batch_size`, so what a model
sees never depends on how Ray scheduled the shards: the plain in-process loop and a Ray actor give
identical outputs, and a resumed run writes exactly the bytes an uninterrupted one would.

A stage is a callable class: `__init__(cfg)` loads its model once, `__call__(batch)` returns the
batch. If `process` raises on a chunk, the chunk is retried image by image so that only the culprit
is marked failed (with the stage name and the error) and the rest of the shard goes on.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from dataengine.config import Resources, RunConfig
from dataengine.inputs import InputItem

# Every replica loads its models once; the per-load progress bars are noise in a mining log.
hf_logging.disable_progress_bar()

PENDING = "pending"
OK = "ok"
NO_INSTANCES = "no_instances"
FAILED = "failed"


@dataclass
class Instance:
    """One object instance of an image, filled in stage by stage."""

    tag: str
    box: list[float]  # xyxy in pixels of the (upright, size-capped) source
    box_score: float
    text_score: float
    mask: np.ndarray | None = None  # bool (H, W), same size as the source
    mask_score: float = 0.0  # SAM's predicted IoU
    mask_stability: float = 0.0  # SAM's stability score (IoU of the mask at logit +/- offset)
    subject: np.ndarray | None = None  # RGBA uint8 crop: box with margin, alpha = mask
    caption: str = ""  # regional caption ("" in caption.mode global)
    clip_score: float | None = None  # CLIP cosine of the regional caption and the crop


@dataclass
class ImageRecord:
    """One input image on its way through the stages; ends as exactly one parquet row."""

    shard: int
    index: int  # position in the input shard: the output order
    item: InputItem
    source_id: str = ""
    image: np.ndarray | None = None  # RGB uint8 (H, W, 3): the stored source
    size: tuple[int, int] | None = None  # (height, width) of the stored source
    phash: str = ""  # perceptual hash (16 hex digits) of the stored source, for near-duplicate detection
    duplicate_of: str = ""  # source_id of the earlier image (input order) this one duplicates
    global_caption: str = ""  # whole-image caption (caption.mode global / both)
    status: str = PENDING
    error: str = ""
    tags: list[str] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)  # reason -> count
    counts: dict[str, int] = field(default_factory=dict)  # stage -> items out (tags, boxes, ...)
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> share of the chunk's time
    samples: list[dict[str, Any]] = field(default_factory=list)  # encoded WebDataset samples

    @property
    def uri(self) -> str:
        return self.item.uri

    def fail(self, stage: str, error: str) -> None:
        """Mark the image failed; it keeps its row and loses its instances."""
        self.status = FAILED
        self.error = f"{stage}: {error}"
        self.instances = []
        self.drops[f"failed_{stage}"] += 1

    def finish(self, reason: str, detail: str = "") -> None:
        """Mark the image as yielding no instance, counting `reason` (a counter name) and saying why."""
        self.status = NO_INSTANCES
        self.error = detail or reason
        self.instances = []
        self.drops[reason] += 1


def make_batch(shard: int, records: list[ImageRecord]) -> dict[str, np.ndarray]:
    """A one-shard batch in Ray Data's numpy format (what the plain loop passes to a stage)."""
    column = np.empty(1, dtype=object)
    column[0] = records
    return {"shard": np.array([shard], dtype=np.int64), "records": column}


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class Stage:
    """Base of every stage: fixed chunking per shard, per-image retry on error, timing.

    Subclasses set `name`, load their model in `__init__`, and implement `process(records)`, which
    must compute everything first and only then assign results to the records (so a retried chunk
    starts clean), and `wants(record)`, which says which records it handles.
    """

    name: ClassVar[str] = "stage"
    # Stages without a model of their own process a whole shard at once.
    default_batch_size: ClassVar[int] = 1 << 30

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        resources = self.resources(cfg)
        self.batch_size = resources.batch_size if resources is not None else self.default_batch_size
        self.device = pick_device()
        self.dtype = pick_dtype(cfg.pipeline.engine.dtype, self.device)
        self.seed = cfg.pipeline.engine.seed

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources | None:
        """The stage's Ray resources (batch size, replicas, CPUs, GPUs); None for light stages."""
        return None

    def wants(self, record: ImageRecord) -> bool:
        """Whether this stage processes the record (default: every image still in the running)."""
        return record.status == PENDING

    def process(self, records: Sequence[ImageRecord]) -> None:
        """Run the stage on a chunk of records (in place)."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Process every shard of a Ray Data numpy batch; returns the same batch, records updated."""
        for records in batch["records"]:
            self.run(records)
        return batch

    def run(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """Process one shard's records in chunks of `batch_size`; a failing chunk is retried per image."""
        active = [r for r in records if self.wants(r)]
        for chunk in chunks(active, self.batch_size):
            start = time.perf_counter()
            try:
                self._seeded(chunk)
            except Exception:  # noqa: BLE001 - isolate the culprit below, nothing is swallowed
                for record in chunk:
                    try:
                        self._seeded([record])
                    except Exception as exc:  # noqa: BLE001 - recorded as the image's failure
                        record.fail(self.name, _describe(exc))
            share = (time.perf_counter() - start) / len(chunk)
            for record in chunk:
                record.seconds[self.name] = record.seconds.get(self.name, 0.0) + share
        return records

    def _seeded(self, chunk: Sequence[ImageRecord]) -> None:
        # Seeding per chunk keeps any sampling the models do independent of what ran before.
        torch.manual_seed(self.seed)
        with torch.inference_mode():
            self.process(chunk)


def _describe(exc: BaseException) -> str:
    """`Type: message` plus the innermost frame, enough to find the bug from a parquet row."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def pick_device() -> str:
    """`cuda` when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    """`engine.dtype` as a torch dtype: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def to_model(inputs, device: str, dtype: torch.dtype):
    """Processor outputs (a dict of tensors, or one tensor) on `device`, floating ones cast to `dtype`.

    Ids and masks keep their integer types; pixels, boxes and the like take the model's dtype.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[key] = to_model(value, device, dtype)
    return inputs


class StageChain:
    """Several stages run one after the other in one process (one Ray actor), e.g. segment → filter → subject.

    Light stages without a model share the actor of the model stage before them instead of each
    holding a Ray worker of their own.
    """

    def __init__(self, stage_classes: Sequence[type[Stage]], cfg: RunConfig):
        self.stages = [cls(cfg) for cls in stage_classes]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch
