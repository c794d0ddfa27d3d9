"""Trainer benchmarks (CPU, tiny zoo): loader throughput, step-time overhead, and the long "it learns" check.

    python benchmarks/bench_train.py loader   # samples/s at 512 px, 2 workers, vs raw tar read + JPEG decode,
                                              # on 512² / 2048x1536 / 4000x3000 sources (--sets, --samples)
    python benchmarks/bench_train.py step     # trainer step vs a bare diffusers UNet forward+backward
    python benchmarks/bench_train.py learn    # training/learning_check.py, stage 1 + stage 2, over 5 seeds
    python benchmarks/bench_train.py all

Prints one JSON object per benchmark; docs/benchmarks.md and docs/training.md record the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402


def zoo() -> Path:
    from scripts.make_tiny_models import build_zoo, zoo_dir

    return build_zoo(zoo_dir(), quiet=True)


def _loader_rate(cfg, builder, samples: int) -> float:
    """Samples/s of a `make_dataloader` loader over `samples` samples, after its first batch (worker start-up)."""
    from training.data import QuadrupletStream, make_dataloader

    loader = iter(make_dataloader(QuadrupletStream(cfg, builder)))
    next(loader)  # worker start-up is not throughput
    batches = samples // cfg.batch_size
    t0 = time.perf_counter()
    for batch in itertools.islice(loader, batches):
        assert batch["pixel_values"].shape[-1] == cfg.resolution
    return batches * cfg.batch_size / (time.perf_counter() - t0)


# Loader steps: (functions whose cumulative profile time counts, functions inside those whose time
# belongs to another step): the lazy decode, then the source decoded inside `crop_resize`.
LOADER_STEPS = {
    "decode": (("training/data.py:decode_lazily", "training/data.py:load_source"), ()),
    "crop": (("inference/zoom.py:crop_resize", "training/data.py:crop_mask"), ("training/data.py:load_source",)),
    "mask_aug": (("training/data.py:augment_mask",), ()),
    "subject": (("inference/subject.py:prepare_subject",), ()),
    "tokenise": (("training/data.py:tokenize",), ()),
}


def _per_sample_cpu_ms(shards: list[str], builder, limit: int = 32) -> dict:
    """CPU ms per sample of the per-sample work (decode + builder) in this process, split by loader step.

    Process CPU time, so other jobs on the machine hardly move it; the split comes from a cProfile
    run (cumulative time of each step's functions), scaled to the unprofiled total; the tar read
    and the collation of batches of 8 are timed on their own.
    """
    import cProfile
    import pstats
    import random

    from webdataset.tariterators import group_by_keys, tar_file_expander

    import training.data as loader_module

    raws: list = []
    c0 = time.process_time()
    for shard in shards:
        with open(shard, "rb") as stream:
            raws += list(itertools.islice(group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])),
                                          limit - len(raws)))
        if len(raws) >= limit:
            break
    read = (time.process_time() - c0) * 1000 / len(raws)  # the tar read, which the loader does too
    def run():
        return [builder(loader_module.decode_lazily(raw), random.Random(i)) for i, raw in enumerate(raws)]

    examples = run()  # warm-up
    t0 = time.process_time()
    run()
    total = (time.process_time() - t0) * 1000 / len(raws)
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cum(name_part: str) -> float:
        return sum(v[3] for k, v in stats.items() if name_part in f"{k[0]}:{k[2]}") * 1000 / len(raws)

    profiled = cum("training/data.py:__call__") + cum("training/data.py:decode_lazily")
    split = {step: round((sum(map(cum, names)) - sum(map(cum, inner))) / profiled * total, 2)
             for step, (names, inner) in LOADER_STEPS.items()}
    batches = [examples[i:i + 8] for i in range(0, len(examples) - 7, 8)]
    t0 = time.process_time()
    for batch in batches:
        loader_module.collate(batch)
    split["collate"] = round((time.process_time() - t0) * 1000 / max(1, 8 * len(batches)), 3)
    split["read"] = round(read, 2)
    return {"cpu_ms_per_sample": round(total + split["collate"] + read, 2), "split_ms": split}


def _raw_rate(shards: list[str]) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of one process reading every member of the tars and fully decoding each source JPEG."""
    import io

    t0, c0 = time.perf_counter(), time.process_time()
    n_raw = 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".source.jpg"):
                    Image.open(io.BytesIO(data)).load()
                    n_raw += 1
    return n_raw / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n_raw


def write_photo_shards(out_dir, width: int, height: int, sources: int = 4, instances: int = 8, seed: int = 0) -> list[str]:
    """Format-v1 shards of camera-photo-sized sources, one shard per source, `instances` samples each.

    The sources are scikit-image photos enlarged to `width` x `height` with sensor-like pixel noise
    (sigma 4), saved as the engine saves them (JPEG q95, 4:4:4): megabytes per source, so that
    decoding costs what it costs on real mined photos. Each instance is an ellipse whose box covers
    1-60 % of the image (log-uniform: the engine's default box filter keeps 1-80 %), with the
    engine's RGBA subject crop (box + 10 % margin, alpha = mask).
    """
    import math
    import random

    import cv2
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageDraw
    from skimage import data as skdata

    from dataengine.schema import Quadruplet, SampleMeta, encode_sample, sample_key, source_id_from_bytes

    photos = [skdata.coffee, skdata.astronaut, skdata.chelsea, skdata.rocket]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = random.Random(f"photo-shards:{seed}")
    for s in range(sources):
        photo = cv2.resize(photos[s % len(photos)](), (width, height), interpolation=cv2.INTER_CUBIC)
        noise = np.random.default_rng(seed * 1000 + s).normal(0, 4, (height, width, 1)).astype(np.float32)
        source = Image.fromarray(np.clip(photo + noise, 0, 255).astype(np.uint8))
        source_id = source_id_from_bytes(source.tobytes()[:1 << 20] + f"{width}x{height}:{s}".encode())
        path = out / f"photo-{width}x{height}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(instances):
                frac = math.exp(rng.uniform(math.log(0.01), math.log(0.6)))
                bw = max(8, round(math.sqrt(frac) * width))
                bh = max(8, round(math.sqrt(frac) * height))
                x0, y0 = rng.randint(0, width - bw), rng.randint(0, height - bh)
                box = (x0, y0, x0 + bw, y0 + bh)
                mask = Image.new("L", (width, height), 0)
                ImageDraw.Draw(mask).ellipse([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=255)
                mx, my = bw // 10, bh // 10
                crop = (max(0, x0 - mx), max(0, y0 - my), min(width, box[2] + mx), min(height, box[3] + my))
                subject = source.crop(crop).convert("RGBA")
                subject.putalpha(mask.crop(crop))
                meta = SampleMeta(
                    source_id=source_id, instance=i, uri=f"synthetic://photo/{width}x{height}/{s}", width=width,
                    height=height, tag="object", box_xyxy=[float(v) for v in box], box_score=1.0, text_score=1.0,
                    mask_score=1.0, mask_area_frac=float(np.asarray(mask, dtype=bool).mean()),
                    models={"generator": "benchmarks/bench_train.py"}, pipeline="benchmark", config_hash="benchmark",
                )
                sink.write(encode_sample(Quadruplet(key=sample_key(source_id, i), source=source, mask=mask,
                                                    subject=subject, text="a photo of an object", meta=meta)))
        paths.append(str(path))
    return paths


SOURCE_SETS = ("512", "2048x1536", "4000x3000")


def _source_shards(tmp: str, name: str, samples: int, resolution: int) -> list[str]:
    """The shards of one benchmark source set: synthetic `resolution`² scenes ("512") or photo-sized JPEGs."""
    from training.synthetic import write_synthetic_shards

    if name == "512":
        return write_synthetic_shards(Path(tmp) / name, num_shards=4, samples_per_shard=samples // 4, size=resolution)
    width, height = (int(v) for v in name.split("x"))
    return write_photo_shards(Path(tmp) / name, width, height)


def bench_loader(samples: int = 256, workers: int = 2, resolution: int = 512, sets: tuple[str, ...] = SOURCE_SETS) -> dict:
    """Loader samples/s (decode + zoom crop + mask aug + subject prep + tokenise) vs raw tar read + JPEG decode.

    Per source set (synthetic 512² scenes, and 2048x1536 / 4000x3000 photo-sized JPEGs), measured in
    one run, so the ratios hold even when other jobs share the cores: the stage-1 loader (no
    RefineNet subject input), the stage-2 loader (with it), and the raw read (every tar member,
    full decode of each source JPEG); plus the CPU time per sample of the per-sample work in one
    process, split by step.
    """
    from transformers import CLIPTokenizer

    from training.config import DataConfig
    from training.data import TrainingExampleBuilder

    tokenizer = CLIPTokenizer.from_pretrained(zoo() / "sd-inpainting", subfolder="tokenizer")
    result = {"benchmark": "loader", "resolution": resolution, "workers": workers, "cpus": os.cpu_count(),
              "samples": samples, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sets:
            shards = _source_shards(tmp, name, samples, resolution)
            cfg = DataConfig.model_validate({"shards": shards, "resolution": resolution, "batch_size": 8,
                                             "num_workers": workers, "resampled": True, "shuffle_buffer": 64})
            figures: dict = {}
            for stage in (1, 2):
                # The raw rate right before each loader, so that each ratio compares figures taken under
                # the same load from other jobs.
                raw_rate, raw_cpu_ms = _raw_rate(shards)
                builder = TrainingExampleBuilder(cfg, tokenizer, clip_size=224, refine_size=resolution,
                                                 refine=stage == 2)
                rate = _loader_rate(cfg, builder, samples)
                figures[f"stage{stage}_raw_tar_jpeg_samples_per_s"] = round(raw_rate, 1)
                figures[f"stage{stage}_loader_samples_per_s"] = round(rate, 1)
                figures[f"stage{stage}_ratio"] = round(rate / raw_rate, 3)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # as in a DataLoader worker
                try:
                    per_sample = _per_sample_cpu_ms(shards, builder)
                finally:
                    torch.set_num_threads(threads)
                figures[f"stage{stage}_per_sample"] = per_sample
                # The same comparison in CPU time, which other jobs on the machine hardly move: the
                # loader on `workers` free cores (tar read + per-sample work + collation)
                # against the raw read + full decode on one.
                figures[f"stage{stage}_raw_cpu_ms_per_sample"] = round(raw_cpu_ms, 2)
                figures[f"stage{stage}_cpu_bound_samples_per_s"] = round(
                    workers * 1000 / per_sample["cpu_ms_per_sample"], 1)
                figures[f"stage{stage}_cpu_ratio"] = round(workers * raw_cpu_ms / per_sample["cpu_ms_per_sample"], 3)
            result["sets"][name] = figures
            print(json.dumps({"set": name, **figures}), file=sys.stderr, flush=True)
    return result


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench_step(batch_size: int = 8, resolution: int = 64, repeats: int = 10) -> dict:
    """Seconds per step: bare UNet fwd+bwd, LAR-Gen model fwd+bwd (stage 1 and 2), the whole trainer step."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from inference.pipeline import LARGenPipeline
    from training.train import ConditionedDenoiser, compute_loss, freeze_for_stage, step_generator

    torch.manual_seed(0)
    pipe = LARGenPipeline.from_pretrained(zoo() / "largen-pipeline")
    model = pipe.model
    h = resolution // 8
    b = batch_size
    noisy, masked = torch.randn(b, 4, h, h), torch.randn(b, 4, h, h)
    mask = (torch.rand(b, 1, h, h) > 0.5).float()
    t = torch.randint(0, 1000, (b,))
    ids = pipe.tokenizer(["a red cup"] * b, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    clip = torch.randn(b, 3, model.image_encoder.config.image_size, model.image_encoder.config.image_size)
    target = torch.randn(b, 4, h, h)
    refine = torch.randn(b, 4, h, h)
    drop = torch.zeros(b, dtype=torch.bool)

    # Bare diffusers UNet (same weights, default attention, text only), everything trainable.
    from diffusers import UNet2DConditionModel

    bare = UNet2DConditionModel.from_pretrained(zoo() / "largen-pipeline", subfolder="unet")
    bare.train()

    def bare_step():
        out = bare(torch.cat([noisy, mask, masked], 1), t, encoder_hidden_states=text).sample
        F.mse_loss(out, target).backward()

    freeze_for_stage(model, 1)
    model.unet.train()
    stage1 = ConditionedDenoiser(model, beta=1.0, use_refine=False)

    def model_step(denoiser, ref=None):
        out = denoiser(noisy, t, mask, masked, text, clip, drop, ref)
        F.mse_loss(out, target).backward()

    # Whole trainer step: VAE + text encoder + model + backward + AdamW.
    params = [p for _, p in model.trainable_parameters(1)]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.rand(b, 3, resolution, resolution) * 2 - 1
    batch = {"pixel_values": pixels,
             "mask": (torch.rand(b, 1, resolution, resolution) > 0.5).float(), "input_ids": ids, "clip_pixels": clip,
             "refine_pixels": pixels, "drop_image": drop}

    def trainer_step():
        gen = step_generator(0, 0, 0, 0, torch.device("cpu"))
        loss = compute_loss(stage1, batch, pipe.vae, pipe.text_encoder, sched, gen, 0.18215, torch.float32,
                            torch.device("cpu"), stage=1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = {"benchmark": "step", "batch_size": b, "resolution": resolution, "device": "cpu"}
    result["bare_unet_fwd_bwd_s"] = _time(bare_step, repeats)
    result["stage1_model_fwd_bwd_s"] = _time(lambda: model_step(stage1), repeats)
    result["stage1_trainer_step_s"] = _time(trainer_step, repeats)
    freeze_for_stage(model, 2)
    stage2 = ConditionedDenoiser(model, beta=0.3, use_refine=True)
    result["stage2_model_fwd_bwd_s"] = _time(lambda: model_step(stage2, refine), repeats)
    result["stage1_model_vs_bare"] = round(result["stage1_model_fwd_bwd_s"] / result["bare_unet_fwd_bwd_s"], 3)
    result["stage1_trainer_vs_bare"] = round(result["stage1_trainer_step_s"] / result["bare_unet_fwd_bwd_s"], 3)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def bench_learn(steps: int | None, refine_steps: int | None, seeds: int, work: str | None) -> dict:
    """The learning checks with the test's settings, over `seeds` seeds: stage 1, then stage 2 from its export.

    Returns per-seed ratios (loss with the true condition / with a shuffled one, inside the hole;
    Refine on / off) and their min / median / max, the figures docs/training.md records.
    """
    import statistics

    from training.learning_check import LEARN_STEPS, REFINE_STEPS, run_learning_check, run_refine_check

    steps, refine_steps = steps or LEARN_STEPS, refine_steps or REFINE_STEPS
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            base = Path(work or tmp) / f"seed{seed}"
            stage1 = run_learning_check(zoo() / "largen-pipeline", base / "stage1", steps=steps, seed=seed)
            stage2 = run_refine_check(stage1["export_dir"], base / "stage2", steps=refine_steps, seed=seed)
            runs.append({"seed": seed, "stage1_seconds": stage1["train_seconds"],
                         "stage2_seconds": stage2["train_seconds"],
                         **{f"stage1_{k}": round(v, 3) for k, v in stage1["ratios"].items()},
                         **{f"stage2_{k}": round(v, 3) for k, v in stage2["ratios"].items()}})
            print(json.dumps({"benchmark": "learn", **runs[-1]}), flush=True)
    summary = {key: {"min": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs),
                     "max": max(r[key] for r in runs)}
               for key in runs[0] if key.startswith(("stage1_", "stage2_"))}
    return {"benchmark": "learn", "steps": steps, "refine_steps": refine_steps, "seeds": seeds,
            "threads": torch.get_num_threads(), "summary": summary}


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into `prog: error: ...`, exit 2)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["loader", "step", "learn", "all"])
    parser.add_argument("--learn-steps", type=positive, default=None, help="stage-1 steps of the learn check (default: the test's)")
    parser.add_argument("--refine-steps", type=positive, default=None, help="stage-2 steps of the learn check (default: the test's)")
    parser.add_argument("--sets", default=",".join(SOURCE_SETS),
                        help=f"loader: comma-separated source sets among {', '.join(SOURCE_SETS)} (default: all)")
    parser.add_argument("--samples", type=positive, default=256, help="loader: samples timed per loader run")
    parser.add_argument("--seeds", type=positive, default=5, help="learn: seeds 0..N-1")
    parser.add_argument("--work", default=None, help="keep the learn check's files here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; the test uses 1)")
    args = parser.parse_args(argv)
    sets = tuple(v for v in args.sets.split(",") if v)
    unknown = [v for v in sets if v not in SOURCE_SETS]
    if unknown or not sets:
        parser.error(f"--sets: unknown source set {', '.join(unknown) or '(none given)'}; choose from {', '.join(SOURCE_SETS)}")
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.which in ("loader", "all"):
        print(json.dumps(bench_loader(samples=args.samples, sets=sets)), flush=True)
    if args.which in ("step", "all"):
        print(json.dumps(bench_step()), flush=True)
    if args.which in ("learn", "all"):
        print(json.dumps(bench_learn(args.learn_steps, args.refine_steps, args.seeds, args.work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
