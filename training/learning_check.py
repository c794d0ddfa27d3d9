"""The "it learns" check: stage 1 on synthetic quadruplets must lower the loss and come to use its conditions.

`run_learning_check` writes synthetic shards whose hole colour is named by the caption and shown
by the subject (training.synthetic), trains stage 1 from a LARGenPipeline folder, and measures the
Eq. 11 loss on held-out batches with fixed noise, before and after training, with the true and
with shuffled (rolled) text + subject conditions. The test suite runs a short version
(tests/training/test_learns.py), `benchmarks/bench_train.py --learn` the long one; the figures
are recorded in docs/training.md.

The tiny zoo's random VAE needs one adjustment, which `calibrated_pipeline` makes: its latent
means vary ~40x less than SD's (scaling_factor 0.18215 assumes SD's VAE) and its posterior noise
is ~7x larger than their spread, so image content would be invisible in the loss. The check
therefore recomputes `scaling_factor` as 1 / std of the latent means on the training images (how
SD's constant was derived) and trains on posterior modes (`optim.vae_latents=mode`).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.pipeline import LARGenPipeline
from training.config import DataConfig, TrainConfig
from training.data import QuadrupletStream, TrainingExampleBuilder, make_dataloader
from training.synthetic import write_synthetic_shards
from training.train import evaluation_loss, train


@torch.no_grad()
def latent_scaling_factor(vae, batches: list[torch.Tensor]) -> float:
    """1 / std of the VAE's latent means over pixel batches in [-1, 1] (SD's 0.18215 is this for its VAE)."""
    means = torch.cat([vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mode() for b in batches])
    return float(1.0 / means.float().std())


def calibrated_pipeline(source: str | Path, dest: Path, pixel_batches: list[torch.Tensor]) -> Path:
    """Copy a LARGenPipeline folder to `dest` with its VAE scaling_factor recomputed on `pixel_batches`."""
    pipe = LARGenPipeline.from_pretrained(source)
    pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(pipe.vae, pixel_batches))
    pipe.save_pretrained(dest)
    return dest


# The hole should dominate the crop so that most of the loss depends on the conditions: box masks,
# tight zoom-in.
CHECK_AUGMENTATION = {"mask": {"precise": 0, "box": 1, "dilated": 0}, "zoom": {"min_expansion": 1.0, "max_expansion": 1.2}}


def _batches(shards: list[str], pipe, resolution: int, count: int, batch_size: int) -> list[dict[str, Any]]:
    """`count` fixed batches without augmentation randomness in the conditions (no dropout)."""
    cfg = DataConfig.model_validate({
        "shards": shards, "resolution": resolution, "batch_size": batch_size, "num_workers": 0,
        "resampled": False, "shuffle_buffer": 1, "dropout": {"text": 0, "image": 0},
        **CHECK_AUGMENTATION,
    })
    builder = TrainingExampleBuilder(cfg, pipe.tokenizer, pipe.image_encoder.config.image_size, resolution,
                                     pipe.feature_extractor)
    return list(itertools.islice(iter(make_dataloader(QuadrupletStream(cfg, builder, seed=7))), count))


def run_learning_check(
    base_pipeline: str | Path, work_dir: str | Path, steps: int = 60, resolution: int = 32, batch_size: int = 8,
    learning_rate: float = 1e-3, train_samples: int = 128, eval_batches: int = 4, seed: int = 0,
) -> dict[str, Any]:
    """Train stage 1 on synthetic data and report the losses (see the module docstring).

    Args:
        base_pipeline: a LARGenPipeline folder (e.g. the tiny zoo's `largen-pipeline`).
        work_dir: shards, the calibrated pipeline and the run go here.

    Returns:
        dict with train_loss_first/last (mean of the first/last 10 steps), eval losses before and
        after training with true and shuffled conditions (whole latent and inside the mask),
        seconds, steps.
    """
    work = Path(work_dir)
    shards = write_synthetic_shards(work / "train", num_shards=4, samples_per_shard=train_samples // 4,
                                    size=64, seed=seed)
    held_out = write_synthetic_shards(work / "eval", num_shards=1, samples_per_shard=eval_batches * batch_size,
                                      size=64, seed=seed + 1)
    probe = LARGenPipeline.from_pretrained(base_pipeline)
    pixel_batches = [b["pixel_values"] for b in _batches(shards, probe, resolution, 4, batch_size)]
    pipeline_dir = calibrated_pipeline(base_pipeline, work / "calibrated-pipeline", pixel_batches)

    cfg = TrainConfig.model_validate({
        "stage": 1, "model": {"pretrained": str(pipeline_dir), "beta": 1.0},
        "data": {"shards": shards, "resolution": resolution, "batch_size": batch_size, "num_workers": 0,
                 "shuffle_buffer": 64, "shuffle_initial": 16, **CHECK_AUGMENTATION},
        "optim": {"max_steps": steps, "learning_rate": learning_rate, "lr_warmup_steps": 0, "seed": seed,
                  "vae_latents": "mode"},
        "checkpoint": {"every": steps, "keep": 1}, "validation": {"every": 0},
        "output": {"dir": str(work / "run"), "log_every": 10},
    })

    def evaluate(pipe) -> dict[str, float]:
        batches = _batches(held_out, pipe, resolution, eval_batches, batch_size)
        model = pipe.model.eval()
        return {
            f"{region}_{name}": evaluation_loss(model, pipe, batches, stage=1, beta=1.0, region=region,
                                                shuffle_conditions=shuffled)
            for region in ("all", "mask") for name, shuffled in (("true", False), ("shuffled", True))
        }

    before = evaluate(LARGenPipeline.from_pretrained(pipeline_dir))
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    after = evaluate(LARGenPipeline.from_pretrained(result.export_dir))
    report = {
        "steps": steps, "resolution": resolution, "batch_size": batch_size, "learning_rate": learning_rate,
        "train_seconds": round(seconds, 1),
        "train_loss_first10": float(np.mean(result.losses[:10])),
        "train_loss_last10": float(np.mean(result.losses[-10:])),
        "before": before, "after": after,
    }
    (work / "learning_check.json").write_text(json.dumps(report, indent=2))
    return report
