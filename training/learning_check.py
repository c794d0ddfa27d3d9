"""The "it learns" checks: stage 1 comes to use each of its conditions; stage 2 trains RefineNet into a gain.

Stage 1 (`run_learning_check`) trains from a LARGenPipeline folder on the synthetic "colour" task
(training.synthetic): the hole is a large square of one of eight saturated colours, named by the
caption and shown by the subject image, in a scene drawn independently of it. The crop is the
hole (`CHECK_AUGMENTATION`), so every latent of it depends on the conditions and on nothing else.
Conditions are dropped independently during training (`data.dropout.text` / `.image`, 0.4 each),
so the model learns the text-only and subject-only modes as well as the joint one, and the check
measures each on held-out samples, inside the hole (m*), with the true condition and with a
shuffled one (another sample's, rolled by one within the batch):

- text mode (null image): true vs shuffled caption, which proves the caption is used;
- subject mode (empty text): true vs shuffled subject, which proves the subject is used;
- both conditions: true vs both shuffled.

Stage 2 (`run_refine_check`) starts from a stage-1 export and trains RefineNet's cross-attention
and the detail encoder (beta 0.3, paper 4.4) on the "pattern" task: a random black/white grid per
sample and the same caption for all, so only the subject's spatial layout tells one hole from
another. It compares, inside the hole, the stage-2 model with Refine on (true subject), Refine on
with a shuffled subject, Refine on with only RefineNet's inputs shuffled (its noisy subject latents
and the detail encoder's tokens; Assign keeps the true subject), and Refine off (the frozen stage-1
UNet, same beta). The main UNet never saw such patterns and stays frozen, so Refine off is exactly
the stage-1 model: on < off shows what the trained RefineNet adds, and on(true) < on(RefineNet's
inputs shuffled) shows that what it adds is this sample's detail. (A whole-subject shuffle is no
test of Refine: it also changes what Assign sees, which alone moves that ratio.)

Why fixed timesteps (`EVAL_TIMESTEPS`): the loss is an epsilon-prediction error, and how much a
condition can lower it depends on the noise level. At small t the noisy latent itself shows most
of the hole, and the tiny UNet's error there is dominated by what it cannot resolve anyway; at
large t the prediction barely depends on the clean latent (its weight sqrt(alpha_bar) /
sqrt(1 - alpha_bar) is tiny), so nothing can help. The check evaluates every held-out batch at a
few middle timesteps (signal-to-noise ratio 1.4 to 0.2 on SD's schedule), where the content of the
hole decides much of the prediction, with fixed noise, so that the figures measure what the
conditions contribute rather than the schedule's average. Training samples timesteps uniformly.

Two adjustments of the tiny zoo's random models, both made by `calibrated_pipeline`:
- its VAE's latent means vary ~40x less than SD's (scaling_factor 0.18215 assumes SD's VAE) and its
  posterior noise is ~7x larger than their spread, so image content would be invisible in the
  loss: the check recomputes `scaling_factor` as 1 / std of the latent means on the training
  images (how SD's constant was derived) and trains on posterior modes (`optim.vae_latents=mode`);
- its UNet has one channel per GroupNorm group, which on the check's 2 x 2 latents erases any
  feature that is the same all over the crop, i.e. what a caption or subject tells about a flat
  hole; `regroup_norms` gives it 8 channels per group (SD 1.5: 10). Measured after 500 steps: with
  one channel per group each condition lowered the masked loss by 13-28 %, with 8 by 53-68 %.

The test suite runs the checks once (tests/training/test_learns.py), `benchmarks/bench_train.py
learn` over several seeds; the figures are recorded in docs/training.md.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from inference.model import LARGenModel
from inference.sdxl import load_largen_pipeline
from training.config import DataConfig, TrainConfig
from training.data import QuadrupletStream, TrainingExampleBuilder, make_dataloader, pixels_to_unit_range
from training.synthetic import write_synthetic_shards
from training.train import evaluation_loss, rewrap, train

# Steps of the test's runs (tests/training/test_learns.py; bench_train.py learn's defaults).
LEARN_STEPS = 400
REFINE_STEPS = 300
# Middle of SD's schedule (scaled_linear, 1000 steps): SNR 1.4, 0.74, 0.38, 0.19. See the module docstring.
EVAL_TIMESTEPS = (300, 400, 500, 600)


@torch.no_grad()
def latent_scaling_factor(vae, batches: list[torch.Tensor]) -> float:
    """1 / std of the VAE's latent means over pixel batches in [-1, 1] (SD's 0.18215 is this for its VAE)."""
    means = torch.cat([vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mode() for b in batches])
    return float(1.0 / means.float().std())


# Channels per GroupNorm group in the check's UNet (SD 1.5's: 320 / 32 = 10). See `regroup_norms`.
CHANNELS_PER_NORM_GROUP = 8


def regroup_norms(unet, channels_per_group: int = CHANNELS_PER_NORM_GROUP) -> int:
    """Give every GroupNorm of `unet` groups of `channels_per_group` of its narrowest width; return the group count.

    The tiny zoo's UNet has 32 groups on 32 channels: one channel per group. On the 2 x 2 to 4 x 4
    latents of the check, such a GroupNorm subtracts each channel's spatial mean, so a feature that is
    the same everywhere in the crop (what a cross-attention to one caption or subject adds, and what
    a flat hole needs) is erased before it reaches the output, and the conditions come to lower the
    loss only slowly (module docstring: measured). SD 1.5's UNet has 10 channels per group on 64 x 64 latents,
    where this does not arise. Only the grouping changes: the norms' weights keep their shapes.
    """
    groups = max(1, min(unet.config.block_out_channels) // channels_per_group)
    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm) and module.num_groups == unet.config.norm_num_groups:
            module.num_groups = groups
    unet.register_to_config(norm_num_groups=groups)
    return groups


def calibrated_pipeline(source: str | Path, dest: Path, pixel_batches: list[torch.Tensor]) -> Path:
    """Copy a LARGenPipeline folder to `dest`, adjusted to the check's tiny scale (see the module docstring).

    The VAE's scaling_factor is recomputed on `pixel_batches`, and the main UNet's GroupNorms get
    `CHANNELS_PER_NORM_GROUP` channels per group (`regroup_norms`). A RefineNet in `source` is
    left out: stage 1 trains without one, and stage 2 copies it from the trained main UNet.
    """
    pipe = load_largen_pipeline(source)
    pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(pipe.vae, pixel_batches))
    model = pipe.model
    if model.has_refine:
        model.unet.set_attn_processor(AttnProcessor2_0())  # drop the Refine injection processors
        model = LARGenModel(model.unet, model.ip_adapter, model.image_encoder)
    regroup_norms(model.unet)
    rewrap(pipe, model).save_pretrained(dest)  # SD-1.5 or SDXL, as `source`
    return dest


# The crop is the hole (box masks on square holes, zoom-in x1.0): every latent of the crop is to be
# inpainted and depends on the conditions only, and the subject image (the hole itself) shows the
# hole at the scale and position of the crop, which Refine needs to line its pattern up. (The
# masked scene is then blank: Locate's context is not what these checks are about.)
CHECK_AUGMENTATION = {"mask": {"precise": 0, "box": 1, "dilated": 0}, "zoom": {"min_expansion": 1.0, "max_expansion": 1.0}}


def _batches(shards: list[str], pipe, resolution: int, count: int, batch_size: int,
             refine: bool = False) -> list[dict[str, Any]]:
    """`count` fixed batches without augmentation randomness in the conditions (no dropout)."""
    cfg = DataConfig.model_validate({
        "shards": shards, "resolution": resolution, "batch_size": batch_size, "num_workers": 0,
        "resampled": False, "shuffle_buffer": 1, "dropout": {"text": 0, "image": 0},
        **CHECK_AUGMENTATION,
    })
    builder = TrainingExampleBuilder(cfg, pipe.tokenizer, pipe.image_encoder.config.image_size, resolution,
                                     pipe.feature_extractor, refine=refine,
                                     tokenizer_2=getattr(pipe, "tokenizer_2", None))  # SDXL's second tokenizer
    return list(itertools.islice(iter(make_dataloader(QuadrupletStream(cfg, builder, seed=7))), count))


def _train_config(stage: int, pretrained: Path, shards: list[str], run_dir: Path, beta: float, resolution: int,
                  batch_size: int, steps: int, learning_rate: float, seed: int, dropout: float) -> TrainConfig:
    return TrainConfig.model_validate({
        "stage": stage, "model": {"pretrained": str(pretrained), "beta": beta},
        "data": {"shards": shards, "resolution": resolution, "batch_size": batch_size, "num_workers": 0,
                 "shuffle_buffer": 64, "shuffle_initial": 16, "dropout": {"text": dropout, "image": dropout},
                 **CHECK_AUGMENTATION},
        "optim": {"max_steps": steps, "learning_rate": learning_rate, "lr_warmup_steps": 0, "seed": seed,
                  "vae_latents": "mode"},
        "checkpoint": {"every": steps, "keep": 1}, "validation": {"every": 0},
        "output": {"dir": str(run_dir), "log_every": 10},
    })


def ratio(report: dict[str, float], true: str, shuffled: str) -> float:
    """loss(true) / loss(shuffled): below 1 when the condition helps (0.75 = 25 % lower)."""
    return report[true] / report[shuffled]


def run_learning_check(
    base_pipeline: str | Path, work_dir: str | Path, steps: int = LEARN_STEPS, resolution: int = 16, batch_size: int = 16,
    learning_rate: float = 3e-3, train_samples: int = 128, eval_batches: int = 2, seed: int = 0,
    dropout: float = 0.4, timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
) -> dict[str, Any]:
    """Train stage 1 on the synthetic "colour" task and report the losses (see the module docstring).

    Args:
        base_pipeline: a LARGenPipeline folder (e.g. the tiny zoo's `largen-pipeline`).
        work_dir: shards, the calibrated pipeline and the run go here.
        dropout: the probability of dropping each condition in training (independently).
        timesteps: the fixed evaluation timesteps.

    Returns:
        dict with train_loss_first10/last10, `before` and `after` losses inside the mask (keys
        `{mode}_{true|shuffled}`, mode text / image / both; `before` only has both), the ratios
        true / shuffled of each mode (`ratios`), train_seconds, and `export_dir` (the stage-1
        export, a LARGenPipeline folder).
    """
    work = Path(work_dir)
    shards = write_synthetic_shards(work / "train", num_shards=4, samples_per_shard=train_samples // 4,
                                    size=64, seed=seed, task="colour")
    held_out = write_synthetic_shards(work / "eval", num_shards=1, samples_per_shard=eval_batches * batch_size,
                                      size=64, seed=seed + 1000, task="colour")
    probe = load_largen_pipeline(base_pipeline)
    pixel_batches = [pixels_to_unit_range(b["pixel_values"]) for b in _batches(shards, probe, resolution, 4, batch_size)]
    pipeline_dir = calibrated_pipeline(base_pipeline, work / "calibrated-pipeline", pixel_batches)
    cfg = _train_config(1, pipeline_dir, shards, work / "run", 1.0, resolution, batch_size, steps, learning_rate,
                        seed, dropout)

    def evaluate(pipe, full: bool) -> dict[str, float]:
        batches = _batches(held_out, pipe, resolution, eval_batches, batch_size)
        model = pipe.model.eval()

        def loss(**kw) -> float:
            return evaluation_loss(model, pipe, batches, stage=1, beta=1.0, region="mask", timesteps=list(timesteps),
                                   **kw)

        out = {"both_true": loss(), "both_shuffled": loss(shuffle_conditions="both")}
        if full:
            out.update({
                "text_true": loss(conditions="text"), "text_shuffled": loss(conditions="text", shuffle_conditions="text"),
                "image_true": loss(conditions="image"),
                "image_shuffled": loss(conditions="image", shuffle_conditions="image"),
            })
        return out

    before = evaluate(load_largen_pipeline(pipeline_dir), full=False)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    after = evaluate(load_largen_pipeline(result.export_dir), full=True)
    report = {
        "stage": 1, "steps": steps, "resolution": resolution, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "dropout": dropout, "timesteps": list(timesteps), "train_seconds": round(seconds, 1),
        "train_loss_first10": float(np.mean(result.losses[:10])),
        "train_loss_last10": float(np.mean(result.losses[-10:])),
        "before": before, "after": after,
        "ratios": {mode: ratio(after, f"{mode}_true", f"{mode}_shuffled") for mode in ("text", "image", "both")},
        "export_dir": result.export_dir,
    }
    (work / "learning_check.json").write_text(json.dumps(report, indent=2))
    return report


def run_refine_check(
    stage1_pipeline: str | Path, work_dir: str | Path, steps: int = REFINE_STEPS, resolution: int = 16, batch_size: int = 16,
    learning_rate: float = 3e-3, train_samples: int = 128, eval_batches: int = 2, seed: int = 0, beta: float = 0.3,
    dropout: float = 0.3, timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
) -> dict[str, Any]:
    """Train stage 2 from a stage-1 export on the synthetic "pattern" task; report Refine on vs off.

    Args:
        stage1_pipeline: a stage-1 export (e.g. `run_learning_check(...)["export_dir"]`); stage 2
            copies RefineNet from its main UNet (paper 4.4).
        work_dir: shards and the run go here.
        beta: the Assign strength of stage 2 (paper: 0.3), used for every evaluation.

    Returns:
        dict with train_loss_first10/last10, the losses inside the mask (`after`: `refine_true`,
        `refine_shuffled` (another sample's subject), `refine_detail_shuffled` (another sample's
        subject for RefineNet's inputs only), `off_true` / `off_shuffled` (Refine off)), the
        ratios `refine_vs_off`, `refine_vs_shuffled` and `refine_vs_detail_shuffled` (only
        RefineNet's inputs shuffled), train_seconds, `export_dir`.
    """
    work = Path(work_dir)
    shards = write_synthetic_shards(work / "train", num_shards=4, samples_per_shard=train_samples // 4,
                                    size=64, seed=seed, task="pattern")
    held_out = write_synthetic_shards(work / "eval", num_shards=1, samples_per_shard=eval_batches * batch_size,
                                      size=64, seed=seed + 1000, task="pattern")
    cfg = _train_config(2, Path(stage1_pipeline), shards, work / "run", beta, resolution, batch_size, steps,
                        learning_rate, seed, dropout)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    pipe = load_largen_pipeline(result.export_dir)
    batches = _batches(held_out, pipe, resolution, eval_batches, batch_size, refine=True)
    model = pipe.model.eval()

    def loss(**kw) -> float:
        return evaluation_loss(model, pipe, batches, stage=2, beta=beta, region="mask", timesteps=list(timesteps), **kw)

    after = {"refine_true": loss(), "refine_shuffled": loss(shuffle_conditions="image"), "off_true": loss(refine=False),
             "off_shuffled": loss(refine=False, shuffle_conditions="image"),
             "refine_detail_shuffled": loss(shuffle_conditions="refine")}
    report = {
        "stage": 2, "steps": steps, "resolution": resolution, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "beta": beta, "timesteps": list(timesteps), "train_seconds": round(seconds, 1),
        "train_loss_first10": float(np.mean(result.losses[:10])),
        "train_loss_last10": float(np.mean(result.losses[-10:])),
        "after": after,
        "ratios": {"refine_vs_off": ratio(after, "refine_true", "off_true"),
                   "refine_vs_shuffled": ratio(after, "refine_true", "refine_shuffled"),
                   "refine_vs_detail_shuffled": ratio(after, "refine_true", "refine_detail_shuffled")},
        "export_dir": result.export_dir,
    }
    (work / "refine_check.json").write_text(json.dumps(report, indent=2))
    return report
