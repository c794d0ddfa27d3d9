"""Benchmark the data engine: embedded Ray vs a sequential in-process loop over the same stage objects.

Mines N generated images (distinct bytes, 96x64 .. 160x120) with the `sample` pipeline and the tiny
zoo twice: `backend=local` (one process, the stages one after the other) and `backend=ray` (an
embedded local Ray, one actor pool per model stage, pipelined over shards). Reports images/s
including start-up (model loading, Ray start) and in steady state (from the first committed shard
to the last), each stage's share of the stage time, the CPU seconds each run used (this process
plus its live descendants: the embedded Ray's processes; actors that ended early are missed), and checks that both runs wrote
identical shards.

    python benchmarks/bench_engine.py --images 256 --json bench-engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dataengine.config import load_run_config  # noqa: E402
from dataengine.engine import STAGE_ORDER, mine  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(96, 161)), int(rng.integers(64, 121))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy + i) % 256], axis=-1)
        img = np.clip(base + rng.integers(-30, 30, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.png")


class CpuMeter:
    """CPU seconds of this process and its descendants (the embedded Ray's raylet, workers, actors).

    Descendants are sampled at every committed shard and the last value seen per process is kept,
    so actors that Ray ends when the dataset finishes still count (minus their last moments).
    """

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.seen: dict[tuple[int, float], float] = {}
        self.sample()
        self.baseline = dict(self.seen)

    def sample(self) -> None:
        me = self.psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                self.seen[(proc.pid, proc.create_time())] = t.user + t.system
            except self.psutil.Error:
                continue  # ended in between

    def used(self) -> float:
        self.sample()
        return sum(v - self.baseline.get(k, 0.0) for k, v in self.seen.items())


def timed_mine(cfg, out: Path, backend: str) -> dict:
    commits: list[tuple[float, int]] = []
    meter = CpuMeter()

    cpu_at_commit: list[float] = []

    def on_commit(stats: dict) -> None:
        commits.append((time.perf_counter(), stats["images"]))
        cpu_at_commit.append(meter.used())

    start = time.perf_counter()
    summary = mine(cfg, out, backend=backend, progress=False, on_commit=on_commit)
    total = time.perf_counter() - start
    cpu = meter.used()
    if backend == "ray":
        import ray

        ray.shutdown()
    first_t, first_n = commits[0]
    steady_images = summary.images - first_n
    steady_s = commits[-1][0] - first_t
    stage_s = {k: summary.seconds.get(k, 0.0) for k in STAGE_ORDER}
    stage_total = sum(stage_s.values()) or 1.0
    return {
        "backend": backend,
        "images": summary.images,
        "samples": summary.samples,
        "seconds_total": round(total, 2),
        "startup_s": round(first_t - start, 2),
        "images_per_s_total": round(summary.images / total, 2),
        "images_per_s_steady": round(steady_images / steady_s, 2) if steady_s > 0 else None,
        "stage_share": {k: round(v / stage_total, 3) for k, v in stage_s.items()},
        "cpu_seconds_total": round(cpu, 1),
        "cpu_ms_per_image": round(1000 * cpu / summary.images, 1),
        "cpu_ms_per_image_steady": round(1000 * (cpu_at_commit[-1] - cpu_at_commit[0]) / steady_images, 1)
        if steady_images
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch threads of the sequential loop (default: torch's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override the sample pipeline, e.g. caption.resources.replicas=2 (both runs)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images)
        cfg = load_run_config(
            REPO / "pipelines.yaml", "sample", profile="tiny",
            overrides=[
                f"inputs=[{{kind: images, path: '{tmp / 'images'}', images_per_shard: {args.images_per_shard}}}]",
                *args.set,
            ],
        )  # fmt: skip
        results = [timed_mine(cfg, tmp / "local", "local"), timed_mine(cfg, tmp / "ray", "ray")]
        identical = all(
            (tmp / "local" / p.name).read_bytes() == p.read_bytes()
            for p in sorted((tmp / "ray").iterdir())
            if p.suffix in (".tar", ".parquet")
        )
    import torch

    local, ray_run = results
    report = {
        "images": args.images,
        "images_per_shard": args.images_per_shard,
        "overrides": args.set,
        "cpus": os.cpu_count(),
        "torch_threads_sequential": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "runs": results,
        "speedup_steady": round(ray_run["images_per_s_steady"] / local["images_per_s_steady"], 2),
        "speedup_total": round(ray_run["images_per_s_total"] / local["images_per_s_total"], 2),
        "identical_shards": identical,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
