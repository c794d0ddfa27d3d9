"""Trainer benchmarks (CPU, tiny zoo): loader throughput, step-time overhead, and the long "it learns" check.

    python benchmarks/bench_train.py loader   # samples/s at 512 px, 2 workers, vs raw tar read + JPEG decode
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


def _per_sample_cpu_ms(shard: str, builder, limit: int = 64) -> dict:
    """CPU ms per sample of decode_sample + the builder in this process (robust to other jobs), and a profile split."""
    import cProfile
    import pstats
    import random

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from dataengine.schema import decode_sample

    with open(shard, "rb") as stream:
        raws = list(itertools.islice(group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])), limit))

    def run():
        for i, raw in enumerate(raws):
            builder(decode_sample(raw), random.Random(i))

    run()  # warm-up
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

    profiled = cum("training/data.py:__call__") + cum("dataengine/schema.py:decode_sample")
    # Shares of the profiled time (the profiler's overhead inflates it), scaled to the unprofiled total.
    parts = {
        "decode_sample (3 images + format checks)": cum("dataengine/schema.py:decode_sample"),
        "prepare_subject": cum("inference/subject.py:prepare_subject"),
        "zoom crop + resize (cv2)": cum("training/data.py:_resize_rgb") + cum("training/data.py:_crop_array")
        + cum("~:<built-in method cv2.resize>"),
        "augment_mask": cum("training/data.py:augment_mask"),
        "tokenize": cum("training/data.py:tokenize"),
    }
    return {"cpu_ms_per_sample": round(total, 2),
            "split_ms": {k: round(v / profiled * total, 2) for k, v in parts.items()}}


def _raw_rate(shards: list[str]) -> float:
    """Samples/s of one process reading every member of the tars and decoding each source JPEG."""
    import io

    t0 = time.perf_counter()
    n_raw = 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".source.jpg"):
                    Image.open(io.BytesIO(data)).load()
                    n_raw += 1
    return n_raw / (time.perf_counter() - t0)


def bench_loader(samples: int = 256, workers: int = 2, resolution: int = 512) -> dict:
    """Loader samples/s (decode + zoom crop + mask aug + subject prep + tokenise) vs raw tar read + JPEG decode.

    Measured in one run, so the ratios hold even when other jobs share the cores: the stage-1
    loader (no RefineNet subject input), the stage-2 loader (with it), and the raw read; plus the
    CPU time per sample of the per-sample work in one process.
    """
    from transformers import CLIPTokenizer

    from training.config import DataConfig
    from training.data import TrainingExampleBuilder
    from training.synthetic import write_synthetic_shards

    tokenizer = CLIPTokenizer.from_pretrained(zoo() / "sd-inpainting", subfolder="tokenizer")
    result = {"benchmark": "loader", "resolution": resolution, "workers": workers, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_shards(tmp, num_shards=4, samples_per_shard=samples // 4, size=resolution)
        cfg = DataConfig.model_validate({"shards": shards, "resolution": resolution, "batch_size": 8,
                                         "num_workers": workers, "resampled": True, "shuffle_buffer": 64})
        for stage in (1, 2):
            # The raw rate right before each loader, so that each ratio compares figures taken under
            # the same load from other jobs.
            raw_rate = _raw_rate(shards)
            builder = TrainingExampleBuilder(cfg, tokenizer, clip_size=224, refine_size=resolution, refine=stage == 2)
            rate = _loader_rate(cfg, builder, samples)
            result[f"stage{stage}_raw_tar_jpeg_samples_per_s"] = round(raw_rate, 1)
            result[f"stage{stage}_loader_samples_per_s"] = round(rate, 1)
            result[f"stage{stage}_ratio"] = round(rate / raw_rate, 3)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a DataLoader worker
            try:
                result[f"stage{stage}_per_sample"] = _per_sample_cpu_ms(shards[0], builder)
            finally:
                torch.set_num_threads(threads)
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
    parser.add_argument("--seeds", type=positive, default=5, help="learn: seeds 0..N-1")
    parser.add_argument("--work", default=None, help="keep the learn check's files here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; the test uses 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.which in ("loader", "all"):
        print(json.dumps(bench_loader()), flush=True)
    if args.which in ("step", "all"):
        print(json.dumps(bench_step()), flush=True)
    if args.which in ("learn", "all"):
        print(json.dumps(bench_learn(args.learn_steps, args.refine_steps, args.seeds, args.work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
