"""The mining engine: input shards → read → tag → ground → segment/filter/subject → caption → encode → shards.

Two executors run the same stage objects on the same per-shard batches:

- `ray` (default): one Ray Data pipeline. Each row is one input shard; every model stage is an
  actor pool (`ActorPoolStrategy`) with the stage's `replicas`, `num_cpus`, `num_gpus` from the
  config, so each replica loads its model once and Ray does the scheduling, backpressure and GPU
  placement; read/decode rides along in the tagger's actors, encode in the captioner's. Connects
  to `RAY_ADDRESS` when it is set (a cluster, or the driver of `ray job submit`), else starts an
  embedded local Ray.
- `local`: a plain loop in this process (tests, debugging, the benchmark's baseline).

The driver commits each shard as soon as its row comes out (`QuadrupletWriter`), shows live
progress, and returns a `RunSummary` whose `table()` is the final summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dataengine.config import Resources, RunConfig
from dataengine.inputs import InputShard, plan_shards
from dataengine.shards import QuadrupletWriter
from dataengine.stages.base import ImageRecord, Stage, StageChain, make_batch
from dataengine.stages.caption import CaptionStage
from dataengine.stages.encode import EncodeStage
from dataengine.stages.filter import FilterStage
from dataengine.stages.ground import GroundStage
from dataengine.stages.read import ReadStage
from dataengine.stages.segment import SegmentStage
from dataengine.stages.subject import SubjectStage
from dataengine.stages.tag import TagStage

logger = logging.getLogger("dataengine")

STAGE_ORDER = ("read", "tag", "ground", "segment", "filter", "subject", "caption", "encode")


@dataclass(frozen=True)
class StageGroup:
    """Stages that run one after the other in the same Ray actors (`resources`: the pool's)."""

    name: str
    stages: tuple[type[Stage], ...]
    resources: Resources


def stage_groups(cfg: RunConfig) -> list[StageGroup]:
    """The pipeline's Ray steps: one actor pool per model; the stages without a model ride along.

    With `engine.layout: fused`, a single pool instead: every replica holds all the models.

    Read/decode shares the tagger's replicas, filter and subject the segmenter's, encode the
    captioner's: every Ray worker imports torch and transformers, so fewer kinds of worker means
    a faster start, and none of these light stages is worth a process of its own.
    """
    p = cfg.pipeline
    if p.engine.layout == "fused":
        # Data parallel: each replica runs whole shards through every stage. On a few CPU cores
        # this avoids time-slicing four model processes per core; on GPUs, one replica per GPU.
        stages = (ReadStage, TagStage, GroundStage, SegmentStage, FilterStage, SubjectStage, CaptionStage, EncodeStage)
        return [StageGroup("fused", stages, p.engine.fused)]
    return [
        StageGroup("tag", (ReadStage, TagStage), p.tag.resources),
        StageGroup("ground", (GroundStage,), p.ground.resources),
        StageGroup("segment", (SegmentStage, FilterStage, SubjectStage), p.segment.resources),
        StageGroup("caption", (CaptionStage, EncodeStage), p.caption.resources),
    ]


def new_records(shard: InputShard) -> list[ImageRecord]:
    """One fresh record per input image of the shard."""
    return [ImageRecord(shard=shard.index, index=i, item=item) for i, item in enumerate(shard.items)]


# --------------------------------------------------------------------------- executors


class LocalExecutor:
    """Every stage in this process, shard after shard (models loaded once, at construction)."""

    def __init__(self, cfg: RunConfig):
        self.chains = [StageChain(g.stages, cfg) for g in stage_groups(cfg)]

    def run(self, shards: Sequence[InputShard]) -> Iterator[tuple[int, list[ImageRecord]]]:
        for shard in shards:
            batch = make_batch(shard.index, new_records(shard))
            for chain in self.chains:
                batch = chain(batch)
            yield shard.index, list(batch["records"][0])


class RayExecutor:
    """The stages as one Ray Data pipeline over input shards (one row per shard)."""

    def __init__(self, cfg: RunConfig, show_ray_progress: bool = False):
        self.cfg = cfg
        connect_ray()
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_operator_progress_bars = show_ray_progress
        ctx.enable_progress_bars = show_ray_progress
        # Rows carry Python records (numpy arrays inside): Ray stores them pickled, as designed.
        ctx.enable_fallback_to_arrow_object_ext_type = True

    def run(self, shards: Sequence[InputShard]) -> Iterator[tuple[int, list[ImageRecord]]]:
        import ray.data

        if not shards:
            return
        rows = [{"shard": s.index, "records": new_records(s)} for s in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        for group in stage_groups(self.cfg):
            res = group.resources
            ds = ds.map_batches(
                StageChain,
                fn_constructor_args=(group.stages, self.cfg),
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=res.replicas),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus or None,
            )
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            for shard_index, records in zip(batch["shard"], batch["records"]):
                yield int(shard_index), list(records)


def connect_ray() -> None:
    """Connect to `RAY_ADDRESS` when set, else start an embedded local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False} if not address else {}
    if os.environ.get("LARGEN_RAY_NUM_CPUS") and not address:
        kwargs["num_cpus"] = int(os.environ["LARGEN_RAY_NUM_CPUS"])
    ray.init(address=address or None, logging_level=logging.WARNING, **kwargs)


# --------------------------------------------------------------------------- the run


@dataclass
class RunSummary:
    """What a run did: shards mined and skipped, images by status, per-stage counts, drops, seconds."""

    output: Path
    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    images: int = 0
    samples: int = 0
    status: Counter = field(default_factory=Counter)
    stage_images_in: Counter = field(default_factory=Counter)
    stage_items_out: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    wall_seconds: float = 0.0

    def add(self, stats: dict) -> None:
        """Sum one committed shard's stats into the run's."""
        self.shards_written += 1
        self.images += stats["images"]
        self.samples += stats["samples"]
        self.status.update(stats["status"])
        self.stage_images_in.update(stats["stage_images_in"])
        self.stage_items_out.update(stats["stage_items_out"])
        self.drops.update(stats["drops"])
        self.seconds.update({k: v for k, v in stats["seconds"].items() if k in STAGE_ORDER})

    def table(self) -> str:
        """The final summary, as plain text."""
        lines = [
            f"output {self.output}: {self.shards_written} shard(s) written, {self.shards_skipped} already committed "
            f"(of {self.shards_total}); {self.images} image(s), {self.samples} sample(s), {self.wall_seconds:.1f} s",
            "images: " + ", ".join(f"{k} {self.status.get(k, 0)}" for k in ("ok", "no_instances", "failed")),
            "",
            f"{'stage':<10}{'images in':>10}{'items out':>11}{'seconds':>10}",
        ]
        for stage in STAGE_ORDER:
            lines.append(
                f"{stage:<10}{self.stage_images_in.get(stage, 0):>10}{self.stage_items_out.get(stage, 0):>11}"
                f"{self.seconds.get(stage, 0.0):>10.2f}"
            )
        if self.drops:
            lines += ["", f"{'drop reason':<28}{'count':>7}"]
            lines += [f"{k:<28}{v:>7}" for k, v in sorted(self.drops.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines)


def mine(
    cfg: RunConfig,
    output: str | os.PathLike,
    overwrite: bool = False,
    backend: str | None = None,
    progress: bool = True,
    on_commit: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Mine the pipeline's inputs into committed shards under `output`.

    Args:
        cfg: the resolved run config.
        output: the output folder.
        overwrite: redo shards that are already committed.
        backend: `ray` or `local`; None takes `engine.backend` from the config.
        progress: show a live progress bar (images done of total, samples, drops) on stderr.
        on_commit: called with each committed shard's stats (tests, monitoring).

    Returns:
        The run's summary.

    Raises:
        InputError: an input cannot be listed.
        ResumeError: the output holds shards of other inputs or another config (and no overwrite).
        ModelLoadError: a model cannot be loaded.
    """
    start = time.perf_counter()
    shards = plan_shards(cfg.pipeline.inputs)
    writer = QuadrupletWriter(output, cfg)
    todo = writer.pending(shards, overwrite=overwrite)
    summary = RunSummary(output=Path(output), shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    by_index = {s.index: s for s in todo}
    total_images = sum(len(s.items) for s in todo)
    backend = backend or cfg.pipeline.engine.backend
    bar = tqdm(total=total_images, unit="img", desc=f"mine {cfg.pipeline_name}", disable=not progress, file=sys.stderr)
    try:
        executor = LocalExecutor(cfg) if backend == "local" else RayExecutor(cfg)
        shard_start = time.perf_counter()
        for shard_index, records in executor.run(todo):
            stats = writer.commit(by_index[shard_index], records, seconds=time.perf_counter() - shard_start)
            shard_start = time.perf_counter()
            summary.add(stats)
            if on_commit is not None:
                on_commit(stats)
            bar.update(stats["images"])
            bar.set_postfix(
                shards=f"{summary.shards_written}/{len(todo)}",
                samples=summary.samples,
                failed=summary.status.get("failed", 0),
                drops=sum(summary.drops.values()),
            )
    finally:
        bar.close()
    summary.wall_seconds = time.perf_counter() - start
    return summary
