"""The mining engine: input shards → dedup → read → tag → ground → segment/filter/subject → caption/agreement → encode → shards.

Two executors run the same stage objects on the same per-shard batches:

- `ray` (default): one Ray Data pipeline. Each row is one input shard; every model stage is an
  actor pool (`ActorPoolStrategy`) with the stage's `replicas`, `num_cpus`, `num_gpus` from the
  config, so each replica loads its model once and Ray does the scheduling, backpressure and GPU
  placement; read/decode rides along in the tagger's actors, encode in the captioner's. Connects
  to `RAY_ADDRESS` when it is set (a cluster, or the driver of `ray job submit`), else starts an
  embedded local Ray.
- `local`: a plain loop in this process (tests, debugging, the benchmark's baseline).

Before the stages, a short pass hashes the pending shards' images (Ray tasks, or in process) so
near-duplicate images are never mined (`dataengine.dedup`: the first in input order is kept).
The driver commits each shard as soon as its row comes out (`QuadrupletWriter`), shows live
progress, and returns a `RunSummary` whose `table()` is the final summary.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dataengine.config import InputSpec, Resources, RunConfig
from dataengine.dedup import Duplicate, HashedImage, hash_shard, plan_duplicates
from dataengine.inputs import InputShard, plan_shards
from dataengine.models import check_models, read_model_config
from dataengine.shards import OutputError, QuadrupletWriter
from dataengine.stages.base import ImageRecord, Stage, StageChain, make_batch
from dataengine.stages.caption import CaptionStage
from dataengine.stages.encode import EncodeStage
from dataengine.stages.filter import AgreementStage, FilterStage
from dataengine.stages.ground import GroundStage
from dataengine.stages.read import ReadStage
from dataengine.stages.segment import SegmentStage
from dataengine.stages.subject import SubjectStage
from dataengine.stages.tag import TagStage, require_ram

logger = logging.getLogger("dataengine")

STAGE_ORDER = ("dedup", "read", "tag", "ground", "segment", "filter", "subject", "caption", "agreement", "encode")

# A duplicate's decision, by (shard index, position in the shard).
DedupPlan = dict[tuple[int, int], tuple[HashedImage, Duplicate | None]]


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
        stages = (
            ReadStage, TagStage, GroundStage, SegmentStage, FilterStage, SubjectStage, CaptionStage, AgreementStage,
            EncodeStage,
        )  # fmt: skip
        return [StageGroup("fused", stages, p.engine.fused)]
    return [
        StageGroup("tag", (ReadStage, TagStage), p.tag.resources),
        StageGroup("ground", (GroundStage,), p.ground.resources),
        StageGroup("segment", (SegmentStage, FilterStage, SubjectStage), p.segment.resources),
        StageGroup("caption", (CaptionStage, AgreementStage, EncodeStage), p.caption.resources),
    ]


def new_records(shard: InputShard, plan: DedupPlan | None = None) -> list[ImageRecord]:
    """One fresh record per input image of the shard; with a dedup plan, duplicates come out finished."""
    records = [ImageRecord(shard=shard.index, index=i, item=item) for i, item in enumerate(shard.items)]
    for record in records if plan is not None else ():
        hashed, duplicate = plan[(shard.index, record.index)]
        record.phash = hashed.phash
        record.seconds["dedup"] = hashed.seconds
        if duplicate is None:
            record.counts["dedup"] = 1
            continue
        record.source_id = hashed.source_id
        record.duplicate_of = duplicate.of
        record.finish(duplicate.reason, duplicate.detail())
    return records


# --------------------------------------------------------------------------- executors


class LocalExecutor:
    """Every stage in this process, shard after shard (models loaded once, at construction)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.chains = [StageChain(g.stages, cfg) for g in stage_groups(cfg)]

    def hash_shards(self, shards: Sequence[InputShard]) -> dict[int, list[HashedImage]]:
        """The dedup pass over `shards`, by shard index."""
        return {s.index: hash_shard(s, self.cfg) for s in shards}

    def run(
        self, shards: Sequence[InputShard], plan: DedupPlan | None = None
    ) -> Iterator[tuple[int, list[ImageRecord]]]:
        for shard in shards:
            batch = make_batch(shard.index, new_records(shard, plan))
            for chain in self.chains:
                batch = chain(batch)
            yield shard.index, list(batch["records"][0])


class RayExecutor:
    """The stages as one Ray Data pipeline over input shards (one row per shard)."""

    def __init__(self, cfg: RunConfig, show_ray_progress: bool = False):
        self.cfg = cfg
        self.embedded = connect_ray()
        import ray.data

        quiet_ray_data_console()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_operator_progress_bars = show_ray_progress
        ctx.enable_progress_bars = show_ray_progress
        # Rows carry Python records (numpy arrays inside): Ray stores them pickled, as designed.
        ctx.enable_fallback_to_arrow_object_ext_type = True

    def hash_shards(self, shards: Sequence[InputShard]) -> dict[int, list[HashedImage]]:
        """The dedup pass over `shards`, by shard index: one Ray task per shard, all in parallel."""
        import ray

        # Reading and decoding is the read stage's work, which runs with the tagger's CPUs.
        task = ray.remote(num_cpus=self.cfg.pipeline.tag.resources.num_cpus, max_retries=0)(hash_shard)
        refs = {s.index: task.remote(s, self.cfg) for s in shards}
        return {index: ray.get(ref) for index, ref in refs.items()}

    def run(
        self, shards: Sequence[InputShard], plan: DedupPlan | None = None
    ) -> Iterator[tuple[int, list[ImageRecord]]]:
        import ray.data

        if not shards:
            return
        rows = [{"shard": s.index, "records": new_records(s, plan)} for s in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        for group in stage_groups(self.cfg):
            res = group.resources
            with warnings.catch_warnings():
                # Ray 2.6x deprecates extra remote args of map_batches but has no named parameter
                # for actor restarts yet; restart_policy() passes them only while Ray accepts them.
                warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
                ds = ds.map_batches(
                    StageChain,
                    fn_constructor_args=(group.stages, self.cfg),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=res.replicas),
                    num_cpus=res.num_cpus,
                    num_gpus=res.num_gpus or None,
                    **self.restart_policy(),
                )
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            for shard_index, records in zip(batch["shard"], batch["records"]):
                yield int(shard_index), list(records)

    def restart_policy(self) -> dict:
        """Actor restarts: none in the embedded Ray, Ray Data's default (restart, retry) on a cluster.

        On one machine what kills a model actor (the OOM killer, a crash in a model) comes back
        after a restart, and Ray Data's default of endless restarts and retries turns it into a
        hang; a run that stops instead resumes exactly. On a cluster an actor also dies with its
        node (preemption, scale-down), which a restart elsewhere fixes. (Restarts on also make Ray
        print a one-time `core_worker.cc ... max_restarts > 0` line: Ray Data passes its actors
        their arguments by reference, ray-project/ray#53727; Ray Data holds those for the whole run.)
        """
        import ray.data

        params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
        takes_remote_args = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        return {"max_restarts": 0} if self.embedded and takes_remote_args else {}


class RayConnectError(ConnectionError):
    """`RAY_ADDRESS` names no reachable Ray cluster (the message is one line naming it)."""


def connect_ray() -> bool:
    """Connect to `RAY_ADDRESS` when set, else start an embedded local Ray (once per process).

    Returns:
        True when this process runs an embedded Ray (started here, or already initialised
        without `RAY_ADDRESS`).

    Raises:
        RayConnectError: `RAY_ADDRESS` is malformed or nothing answers there.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address and "ray" not in sys.modules:
        # A new local Ray turns token authentication on by itself and warns that it did, on every
        # run; asking for it explicitly keeps the same security without the warning. Ray reads the
        # variable when it is imported, hence only before; a user's own RAY_AUTH_MODE is kept.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return not address
    if address:
        _probe_ray_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayConnectError(f"RAY_ADDRESS={address!r}: cannot connect: {first}") from exc
        return False
    kwargs: dict = {"include_dashboard": False}
    if os.environ.get("LARGEN_RAY_NUM_CPUS"):
        kwargs["num_cpus"] = int(os.environ["LARGEN_RAY_NUM_CPUS"])
    # "local": always a new instance. Without it ray.init joins whatever cluster a `ray start` on
    # this machine last recorded in /tmp/ray/ray_current_cluster, and retries for many minutes
    # when that cluster is gone.
    ray.init(address="local", logging_level=logging.WARNING, **kwargs)
    return True


def _probe_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a `host:port` RAY_ADDRESS where nothing listens (ray.init retries for minutes)."""
    if address in ("auto", "local"):
        return  # ray.init looks up the local cluster itself and fails at once
    target = address.removeprefix("ray://")
    if "://" in target:
        raise RayConnectError(
            f"RAY_ADDRESS={address!r}: expected the GCS address HOST:PORT (e.g. 127.0.0.1:6379), "
            "not a URL; the dashboard's http:// address is for `ray job submit`"
        )
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayConnectError(f"RAY_ADDRESS={address!r}: expected HOST:PORT, e.g. 127.0.0.1:6379")
    import socket

    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayConnectError(
            f"RAY_ADDRESS={address!r}: no Ray cluster answers at {host}:{port} ({reason}); "
            "start one with `ray start --head`, or unset RAY_ADDRESS to run an embedded Ray"
        ) from exc


class _DropRayDataBarsNotice(logging.Filter):
    """Drops Ray Data's notice that its progress bars are off: the engine shows its own bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_ray_data_console() -> None:
    """Ray Data's console shows warnings and errors only; its INFO lines stay in its log files.

    A healthy run otherwise prints three INFO lines per dataset (start, plan, finish) between
    the engine's progress bar and summary. Left alone when the user configures Ray Data logging
    (RAY_DATA_LOG_LEVEL, RAY_DATA_LOGGING_CONFIG).
    """
    if os.environ.get("RAY_DATA_LOG_LEVEL") or os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    for handler in logging.getLogger("ray.data").handlers:
        # Ray Data's console handler is a StreamHandler; its file handlers are not.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropRayDataBarsNotice) for f in progress_logger.filters):
        progress_logger.addFilter(_DropRayDataBarsNotice())


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
        if self.samples or self.shards_skipped:
            lines += ["", f"see the samples: python -m dataengine.preview {shlex.quote(str(self.output))}"]
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
        OutputError: the output is a file, cannot be created, holds other files, or lies in an input.
        ResumeError: the output holds shards of other inputs or another config (and no overwrite).
        ModelLoadError: a model cannot be loaded.
        TagBackendError: the bundled RAM++ tag files are broken (a RAM++ checkpoint that is missing or
            mismatched raises ModelLoadError).
        RayConnectError: `RAY_ADDRESS` names no reachable cluster.
    """
    start = time.perf_counter()
    shards = plan_shards(cfg.pipeline.inputs)
    check_output_outside_inputs(output, cfg.pipeline.inputs)
    check_models_of(cfg)
    created = not Path(output).exists()
    try:
        writer = QuadrupletWriter(output, cfg)
        return _mine_into(cfg, writer, shards, overwrite, backend, progress, on_commit, start)
    except BaseException:
        # A run that fails before writing anything (e.g. Ray unreachable) leaves no empty folder behind.
        if created and Path(output).is_dir() and not any(Path(output).iterdir()):
            Path(output).rmdir()
        raise


def _mine_into(
    cfg: RunConfig,
    writer: QuadrupletWriter,
    shards: Sequence[InputShard],
    overwrite: bool,
    backend: str | None,
    progress: bool,
    on_commit: Callable[[dict], None] | None,
    start: float,
) -> RunSummary:
    output = writer.out_dir
    todo = writer.pending(shards, overwrite=overwrite)
    summary = RunSummary(output=Path(output), shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    by_index = {s.index: s for s in todo}
    total_images = sum(len(s.items) for s in todo)
    backend = backend or cfg.pipeline.engine.backend
    bar = tqdm(total=total_images, unit="img", desc=f"mine {cfg.pipeline_name}", disable=not progress, file=sys.stderr)
    try:
        if not todo:  # a finished run resumed: nothing to load, no Ray to start
            return _finish(summary, start)
        executor = LocalExecutor(cfg) if backend == "local" else RayExecutor(cfg)
        plan = None
        if cfg.pipeline.dedup.enabled:
            hashed = executor.hash_shards(todo)
            for shard in shards:
                if shard.index not in hashed:  # committed earlier: its parquet holds the hashes
                    hashed[shard.index] = writer.committed_hashes(shard)
            plan = plan_duplicates(shards, hashed, cfg.pipeline.dedup.max_distance)
        shard_start = time.perf_counter()
        for shard_index, records in executor.run(todo, plan):
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
    return _finish(summary, start)


def _finish(summary: RunSummary, start: float) -> RunSummary:
    summary.wall_seconds = time.perf_counter() - start
    return summary


def check_output_outside_inputs(output: str | os.PathLike, inputs: Sequence[InputSpec]) -> None:
    """Refuse an output folder that is, or lies inside, a local input folder.

    Raises:
        OutputError: naming both; the next run would list the outputs as inputs (tars) or mix
            the mined files into the user's photo folder.
    """
    out = Path(output).expanduser().resolve()
    for spec in inputs:
        if "://" in spec.path or spec.kind == "table":
            continue
        folder = Path(spec.path).expanduser()
        if folder.is_dir() and (out == folder.resolve() or folder.resolve() in out.parents):
            raise OutputError(
                f"output {os.fspath(output)!r} is inside the input folder {spec.path!r}; "
                "choose a folder outside it"
            )


def check_models_of(cfg: RunConfig) -> None:
    """Check every model of the run here, before Ray starts: one clear error, not one per actor.

    Raises:
        ModelLoadError: a checkpoint is missing or of the wrong kind.
        TagBackendError: the bundled RAM++ tag files are broken (a RAM++ checkpoint that is missing or
            mismatched raises ModelLoadError).
    """
    clip_tagger = cfg.pipeline.tag.backend == "clip"
    if not clip_tagger:
        require_ram(cfg.profile.tagger)  # keys and shapes, no weights read; a hub file is fetched once here
    p = cfg.profile
    check_models(p.tagger if clip_tagger else None, p.grounding, p.segmenter, p.captioner)
    if cfg.pipeline.caption.mode != "global":  # the caption <-> crop agreement filter's CLIP
        from transformers import CLIPModel

        read_model_config("clip", p.clip, CLIPModel)
