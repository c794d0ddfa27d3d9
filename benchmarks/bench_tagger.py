"""CPU cost of the tag stage per image: RAM++ (`tag.backend: ram`) vs CLIP zero-shot (`clip`), tiny zoo.

Runs the real `TagStage` of the `sample` pipeline (tiny profile) over its six photos, cycled to
`--images` images, in the pipeline's chunks (`tag.resources.batch_size`, 2 in `sample`, or
`--batch`): pre-processing, the model, thresholds and the non-entity filter, everything the stage
does. Best of `--rounds` rounds after a warm-up chunk. The tiny models are random and small, so
this compares the stages' overheads and the models' shapes at equal footing, not full-size speed.

`--full-size` instead times the two taggers' networks at their published sizes with random weights
(RAM++ Swin-L 384 px with 4,585 tags; CLIP ViT-L/14 224 px image tower, the text side of zero-shot
being computed once per run), forward pass only, on this CPU (`benchmarks/gpu_ram.py`: RAM++ on a GPU).

    .venv/bin/python benchmarks/bench_tagger.py --images 64 --threads 1
    .venv/bin/python benchmarks/bench_tagger.py --full-size --images 2 --rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.config import load_run_config  # noqa: E402
from dataengine.engine import new_records  # noqa: E402
from dataengine.inputs import plan_shards, write_sample_images  # noqa: E402
from dataengine.stages.read import ReadStage  # noqa: E402
from dataengine.stages.tag import TagStage  # noqa: E402
from scripts.make_tiny_models import build_zoo, zoo_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def decoded_images(folder: Path, count: int, batch: int | None):
    """The sample pipeline's config and `count` decoded records (the six photos, cycled)."""
    inputs = f"inputs=[{{kind: images, path: '{folder}', images_per_shard: 6}}]"
    overrides = [inputs] + ([f"tag.resources.batch_size={batch}"] if batch else [])
    cfg = load_run_config(REPO / "pipelines.yaml", "sample", profile="tiny", overrides=overrides)
    shard = plan_shards(cfg.pipeline.inputs)[0]
    read = ReadStage(cfg).run(new_records(shard))
    records = [
        dataclasses.replace(read[i % len(read)], index=i, drops=Counter(), counts={}, seconds={}) for i in range(count)
    ]
    return cfg, records


def fresh(records):
    return [dataclasses.replace(r, tags=[], drops=Counter(), counts=dict(r.counts), seconds={}) for r in records]


def time_backend(cfg, records, backend: str, rounds: int) -> dict:
    """Best seconds per image of `TagStage.run` with `backend`, and what it kept."""
    cfg = cfg.model_copy(deep=True)
    cfg.pipeline.tag = cfg.pipeline.tag.model_copy(update={"backend": backend})
    if backend == "clip":
        cfg.profile = cfg.profile.model_copy(update={"tagger": cfg.profile.clip})  # as Profile.resolved does
    start = time.perf_counter()
    stage = TagStage(cfg)
    load_s = time.perf_counter() - start
    stage.run(fresh(records[: stage.batch_size]))  # warm-up: first-call allocations, kernels
    best = float("inf")
    for _ in range(rounds):
        batch = fresh(records)
        start = time.perf_counter()
        stage.run(batch)
        best = min(best, time.perf_counter() - start)
    model = stage.tagger.model if stage.tagger is not None else stage.model
    return {
        "backend": backend,
        "ms_per_image": round(best / len(records) * 1000, 2),
        "load_s": round(load_s, 2),
        "params_k": round(sum(p.numel() for p in model.parameters()) / 1e3, 1),
        "tags_per_image": round(sum(len(r.tags) for r in batch) / len(batch), 2),
        "batch_size": stage.batch_size,
    }


def time_full_size(images: int, rounds: int) -> list[dict]:
    """Seconds per image of each tagger's network at its published size (random weights, batch `images`)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dataengine.ram.model import RamPlus, RamPlusConfig

    vit_l14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768)  # fmt: skip
    ram_config = RamPlusConfig.full()
    models = [("ram", RamPlus(ram_config), ram_config.image_size), ("clip", CLIPVisionModelWithProjection(vit_l14), 224)]
    results = []
    for backend, model, size in models:
        model.eval()
        pixels = torch.randn(images, 3, size, size)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(rounds):
                start = time.perf_counter()
                if backend == "ram":
                    model(pixels)
                else:
                    model(pixel_values=pixels)
                best = min(best, time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        results.append({"backend": backend, "s_per_image": round(best / images, 2), "params_m": round(params, 1),
                        "image_size": size})  # fmt: skip
        del model
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, help="tag.resources.batch_size (default: the sample pipeline's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--full-size", action="store_true", help="time the networks at published size instead")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--images, --rounds and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full_size:
        report = {"images": args.images, "threads": torch.get_num_threads(), "full_size": time_full_size(
            args.images, args.rounds)}  # fmt: skip
        for r in report["full_size"]:
            print(f"{r['backend']:<5} {r['s_per_image']:>7} s/image  {r['params_m']:>7} M params  {r['image_size']} px")
        print(json.dumps(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    build_zoo(zoo_dir(), only=["ram-plus", "clip-tagger"], quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_images(tmp)
        cfg, records = decoded_images(Path(tmp), args.images, args.batch)
        results = [time_backend(cfg, records, backend, args.rounds) for backend in ("ram", "clip")]
    report = {"images": args.images, "threads": torch.get_num_threads(), "results": results}
    print(f"{'backend':<8} {'ms/image':>9} {'load s':>7} {'params k':>9} {'tags/img':>9} {'batch':>6}")
    for r in results:
        print(f"{r['backend']:<8} {r['ms_per_image']:>9} {r['load_s']:>7} {r['params_k']:>9} "
              f"{r['tags_per_image']:>9} {r['batch_size']:>6}")  # fmt: skip
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
