"""The two-stage LAR-Gen trainer (paper 4.4, 6.2) on accelerate: `accelerate launch -m training.train --config ...`.

Stage 1 trains the main UNet with Assign's to_k_ip/to_v_ip (beta = 1; image encoder and
resampler frozen; no RefineNet). Stage 2 freezes the main UNet, attaches RefineNet (a copy of the
main UNet, `LARGenModel.add_refine`) and trains its cross-attention layers and the detail MLP
(beta = 0.3). Loss Eq. 11: MSE between the added noise and the prediction.

Checkpoints (`OUT/checkpoint-{step}`, the last N kept) hold everything for an exact resume: the
trained weights (safetensors), optimizer, LR scheduler and RNG states (accelerate), the EMA
weights, the step and each process's data-loader position. Every random draw of a step (timesteps,
noise, VAE sampling) comes from a generator seeded by (seed, step, micro-step, process), and the
loader is deterministic in its position, so 2 steps + resume + 2 steps equals 4 steps. The export
(`OUT/final`) is a folder `LARGenPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dataengine.typed_config import ConfigError
from inference.loading import CheckpointNotFoundError, _looks_like_local_path
from inference.model import LARGenModel
from inference.pipeline import LARGenPipeline
from inference.sdxl import (
    LARGenXLPipeline,
    encode_sdxl_ids,
    load_largen_pipeline,
    pipeline_class_name,
    sdxl_time_ids,
)
from training.config import TrainConfig, load_train_config
from training.data import (
    LoaderState,
    NoSamplesError,
    QuadrupletStream,
    ShardError,
    TrainingExampleBuilder,
    available_cpus,
    check_shards,
    describe_error,
    make_dataloader,
    pixels_to_unit_range,
    stop_workers,
)
from training.validation import log_validation

logger = logging.getLogger("training")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINER_STATE = "trainer_state.json"
EXPORT_DIR = "final"
SUMMARY_FILE = "train_summary.json"
FINAL_LOSS_STEPS = 10  # the summary's final loss is the mean over this many last steps


class TrainInputError(ValueError):
    """A bad input of a training run (a path, a checkpoint, a config value); reported as one line, exit 2."""


@dataclass
class TrainResult:
    """What a run did: steps, per-step losses of this run, skip counts, where things are."""

    step: int
    losses: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    export_dir: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    samples_per_second: float = 0.0
    wall_seconds: float = 0.0

    def final_loss(self, last: int = FINAL_LOSS_STEPS) -> float | None:
        """Mean loss of the last `last` steps of this run (None when it ran no step)."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail) if tail else None


class ConditionedDenoiser(nn.Module):
    """One module whose forward does everything that has gradients: subject encoding, dropout, denoising.

    Keeping the detail encoder inside the (DDP-wrapped) forward lets accelerate synchronise its
    gradients like any other parameter.
    """

    def __init__(self, model: LARGenModel, beta: float, use_refine: bool):
        super().__init__()
        self.model = model
        self.beta = beta
        self.use_refine = use_refine

    def forward(self, noisy_latents, timesteps, mask, masked_latents, text_embeds, clip_pixels, drop_image,
                refine_latents=None, detail_clip_pixels=None, added_cond_kwargs=None, refine_added_cond_kwargs=None):
        # `detail_clip_pixels`: a different subject for the detail encoder only (RefineNet's cross-attention),
        # which the checks use to separate what Refine brings from what Assign brings; None: the same subject.
        image_embeds, detail_embeds = self.model.encode_subject(clip_pixels)
        if detail_clip_pixels is not None and self.use_refine:
            detail_embeds = self.model.encode_subject(detail_clip_pixels)[1]
        if drop_image.any():
            null = self.model.null_image_embeds(image_embeds.shape[0]).to(image_embeds.dtype)
            image_embeds = torch.where(drop_image[:, None, None], null, image_embeds)
        return self.model(
            noisy_latents, timesteps, mask, masked_latents, text_embeds, image_embeds, beta=self.beta,
            refine_latents=refine_latents if self.use_refine else None,
            detail_embeds=detail_embeds if self.use_refine else None,
            added_cond_kwargs=added_cond_kwargs,
            refine_added_cond_kwargs=refine_added_cond_kwargs if self.use_refine else None,
        )


class SDXLTextConditions(nn.Module):
    """SDXL's text and added conditions of a batch, for `predict_noise` in place of the text encoder.

    Both (frozen) text encoders give the cross-attention tokens and the pooled embedding
    (`inference.sdxl.encode_sdxl_ids`, as the pipeline), and each sample's added time ids come from
    its own crop (`crop_box`, `source_size` of the loader, `inference.sdxl.sdxl_time_ids`), so
    training sees the micro-conditioning the pipeline gives that crop. RefineNet gets the pooled
    embedding of the empty text, as in the pipeline.
    """

    def __init__(self, pipe: LARGenXLPipeline, resolution: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.resolution = resolution
        self.empty_ids = [
            tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)
        ]

    def forward(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict, dict]:
        """(text tokens [B, L, D], added_cond_kwargs, refine_added_cond_kwargs) of a collated batch."""
        tokens, pooled = encode_sdxl_ids(self.text_encoder, self.text_encoder_2, batch["input_ids"].to(device),
                                         batch["input_ids_2"].to(device))
        ids = [sdxl_time_ids(box.tolist(), tuple(size.tolist()), self.resolution)
               for box, size in zip(batch["crop_box"], batch["source_size"])]
        time_ids = torch.tensor(ids, device=device, dtype=torch.float32)  # sizes > 256 are not exact in bf16
        empty = encode_sdxl_ids(self.text_encoder, self.text_encoder_2, *(t.to(device) for t in self.empty_ids))[1]
        return (tokens, {"text_embeds": pooled, "time_ids": time_ids},
                {"text_embeds": empty.expand(pooled.shape[0], -1), "time_ids": time_ids})


def text_conditions(pipe: LARGenPipeline, resolution: int) -> nn.Module:
    """What `predict_noise` encodes captions with: the text encoder (SD-1.5) or `SDXLTextConditions`."""
    return SDXLTextConditions(pipe, resolution) if isinstance(pipe, LARGenXLPipeline) else pipe.text_encoder


def rewrap(pipe: LARGenPipeline, model: LARGenModel) -> LARGenPipeline:
    """A pipeline of `pipe`'s class and components around `model` (SDXL keeps its second encoder and defaults)."""
    extra: dict[str, Any] = {}
    if isinstance(pipe, LARGenXLPipeline):
        extra = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2,
                 **{k: pipe.config[k] for k in ("beta_text", "beta_subject", "beta_text_subject", "guidance_rescale")
                    if k in pipe.config}}
    return type(pipe).from_model(model, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                 pipe.feature_extractor, **extra)


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step: a pure function of (seed, step, micro-step, process)."""
    state = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-{step}` folders under `output_dir`, oldest first (half-written `.tmp` ones ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: str | None, stage: int | None = None) -> Path | None:
    """The checkpoint to resume from: `latest` (None when there is none yet) or a path.

    Args:
        stage: when given, the checkpoint must have been written by this stage.

    Raises:
        TrainInputError: an explicit path does not exist or is not a complete checkpoint, or the
            checkpoint belongs to another stage.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = output_dir / resume
        if not path.exists():
            raise TrainInputError(f"--resume_from_checkpoint {resume}: {path} does not exist "
                                  f"(give 'latest' or a checkpoint-<step> folder)")
        if not (path / TRAINER_STATE).is_file():
            raise TrainInputError(f"--resume_from_checkpoint {resume}: {path} is not a complete checkpoint "
                                  f"(no {TRAINER_STATE})")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        written_by = int(state["stage"]) if "stage" in state else None
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise TrainInputError(f"--resume_from_checkpoint: {path / TRAINER_STATE} is unreadable "
                              f"({describe_error(exn)})") from None
    if stage is not None and written_by is not None and written_by != stage:
        raise TrainInputError(f"--resume_from_checkpoint: {path} was written by stage {written_by}, "
                              f"this run is stage {stage}; use another output.dir")
    return path


def check_output_dir(out_dir: Path) -> None:
    """Create `output.dir` (and its parents) and make sure files can be written in it.

    Raises:
        TrainInputError: it is an existing file, or it cannot be created or written.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainInputError(f"output.dir {str(out_dir)!r} is an existing file, not a folder")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exn:
        raise TrainInputError(f"output.dir {str(out_dir)!r} cannot be written ({describe_error(exn)})") from None


def check_model_source(cfg: TrainConfig) -> None:
    """Fail early when the starting model is a local folder that is missing or not the right kind.

    Hub ids (`owner/name`) are left to the loader.

    Raises:
        TrainInputError: `model.pretrained` is not a pipeline folder, or a `model.base` folder is missing.
    """
    if cfg.model.pretrained is not None:
        ref = cfg.model.pretrained
        if not _looks_like_local_path(ref):
            return
        path = Path(ref).expanduser()
        hint = ("; stage 2 starts from the stage-1 export (OUT/stage1/final): run stage 1 first "
                "(`make train` does both)") if cfg.stage == 2 else ""
        if not path.exists():
            raise TrainInputError(f"model.pretrained {ref!r} does not exist{hint}")
        if not (path / "model_index.json").is_file():
            what = "a file" if path.is_file() else "a folder without model_index.json"
            raise TrainInputError(f"model.pretrained {ref!r} is not a LARGenPipeline folder ({what}){hint}")
        return
    base = cfg.model.base
    for key, ref in (("model.base.inpaint", base.inpaint), ("model.base.image_prompt", base.image_prompt)):
        if _looks_like_local_path(ref) and not Path(ref).expanduser().is_dir():
            raise TrainInputError(f"{key} {ref!r} is not a folder (give a hub id or a downloaded checkpoint)")


def preflight(cfg: TrainConfig, resume_from_checkpoint: str | None) -> tuple[Path | None, list[str]]:
    """Check every input of a run before anything is loaded or written (cheap; every process runs it).

    Returns:
        (the checkpoint to resume from or None, the readable training shard URLs).

    Raises:
        TrainInputError / ShardError: with one line naming the key or argument and what is wrong.
    """
    out_dir = Path(cfg.output.dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainInputError(f"output.dir {str(out_dir)!r} is an existing file, not a folder")
    resume_path = resolve_resume(out_dir, resume_from_checkpoint, stage=cfg.stage)
    check_model_source(cfg)
    if cfg.optim.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        make_optimizer([], cfg.optim)  # raises its one-line error before anything is loaded
    shards = check_shards(cfg.data.shards, "data.shards")
    if cfg.validation.every and cfg.validation.shards:
        check_shards(cfg.validation.shards, "validation.shards")
    check_output_dir(out_dir)
    return resume_path, shards


def load_model(cfg: TrainConfig) -> tuple[LARGenPipeline, LARGenModel]:
    """Load the pipeline (`model.pretrained`) or build it from its bases (`model.base`), shaped for the stage.

    Stage 1 has no Refine: a RefineNet in the starting pipeline is left out (stage 2 re-copies it
    from the trained main UNet, paper 4.4). Stage 2 adds RefineNet, copied from the main UNet, and
    a new detail encoder, unless the pipeline already has them (continuing a stage 2).

    The backbone follows the starting folder: an SDXL-inpainting base (`model_index.json` of a
    `StableDiffusionXLInpaintPipeline`) or an SDXL LAR-Gen folder (`LARGenXLPipeline`) trains SDXL.

    Returns:
        (pipeline, its model); the pipeline is what the export saves.
    """
    if cfg.model.base is not None:
        b = cfg.model.base
        xl = pipeline_class_name(b.inpaint) == "StableDiffusionXLInpaintPipeline"
        pipe = (LARGenXLPipeline if xl else LARGenPipeline).from_base(
            b.inpaint, b.image_prompt, subfolder=b.subfolder, weight_name=b.weight_name,
            image_encoder_folder=b.image_encoder, with_refine=False, seed=cfg.optim.seed,
        )
    else:
        pipe = load_largen_pipeline(cfg.model.pretrained)
    model = LARGenModel.from_pipeline(pipe)
    if cfg.stage == 1 and model.has_refine:
        logger.info("stage 1 trains without Refine: leaving out the RefineNet of %s", cfg.model.pretrained)
        model.unet.set_attn_processor(AttnProcessor2_0())  # drop the Refine injection processors
        model = LARGenModel(model.unet, model.ip_adapter, model.image_encoder)
        pipe = rewrap(pipe, model)
    if cfg.stage == 2 and not model.has_refine:
        model.add_refine(seed=cfg.optim.seed)  # RefineNet initialised from the (stage-1) main UNet
        pipe = rewrap(pipe, model)
    return pipe, model


def make_optimizer(params: list[nn.Parameter], opt) -> torch.optim.Optimizer:
    """AdamW over `params`: torch's, or bitsandbytes' 8-bit AdamW (`optim.optimizer: adamw8bit`).

    Raises:
        TrainInputError: adamw8bit without bitsandbytes installed.
    """
    kwargs = {"lr": opt.learning_rate, "betas": (opt.adam_beta1, opt.adam_beta2),
              "weight_decay": opt.adam_weight_decay, "eps": opt.adam_epsilon}
    if opt.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise TrainInputError("optim.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes; "
                                  "CUDA GPU), or use optim.optimizer=adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def freeze_for_stage(model: LARGenModel, stage: int) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze exactly `model.trainable_parameters(stage)`; return them."""
    model.requires_grad_(False)
    trainable = model.trainable_parameters(stage)
    for _, p in trainable:
        p.requires_grad_(True)
    return trainable


def _flat(prefix: str, data: Any) -> dict[str, Any]:
    """Flatten a config for tensorboard hparams (scalars and strings only)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: data if isinstance(data, int | float | str | bool) else str(data)}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume_from_checkpoint: str | None = None) -> TrainResult:
    """Run one training stage to `cfg.optim.max_steps`.

    Args:
        cfg: the validated stage config.
        resume_from_checkpoint: `latest`, a checkpoint folder, or None (start fresh).

    Returns:
        TrainResult (losses of the steps this call ran).

    Raises:
        TrainInputError / ShardError: a bad path, model, checkpoint or shard list (checked before
            anything is loaded or written, see `preflight`).
        NoSamplesError: the data stream stopped (data.max_consecutive_failures in a row failed).
    """
    t_begin = time.perf_counter()
    out_dir = Path(cfg.output.dir)
    opt = cfg.optim
    resume_path, shard_urls = preflight(cfg, resume_from_checkpoint)
    workers = min(cfg.data.num_workers, available_cpus())
    if workers != cfg.data.num_workers:
        # More workers than CPUs only adds processes that compete for the same cores (torch warns).
        logger.info("data.num_workers=%d capped to %d, the CPUs available", cfg.data.num_workers, workers)
        cfg = cfg.model_copy(deep=True)
        cfg.data.num_workers = workers
    # 1. Accelerator: accumulation, precision, tensorboard, checkpoint folders named by us.
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=opt.gradient_accumulation_steps,
            mixed_precision=opt.mixed_precision,
            log_with="tensorboard",
            # No find_unused_parameters: every parameter trainable_parameters() returns reaches the loss
            # (stage 2 leaves out RefineNet's attn2 layers after its last captured decoder input).
            project_config=ProjectConfiguration(
                project_dir=str(out_dir), logging_dir=str(out_dir / "logs"), automatic_checkpoint_naming=False
            ),
        )
    except ValueError as exn:  # e.g. fp16 without a GPU
        raise TrainInputError(f"optim.mixed_precision={opt.mixed_precision}: {describe_error(exn)}") from None
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:
        # ZeRO (training/accelerate/deepspeed-zero2.yaml): the loader is not passed to prepare(), so
        # DeepSpeed learns the micro-batch from here, and clips by the stage's own norm.
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = opt.max_grad_norm
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    set_seed(opt.seed)
    device = accelerator.device

    # 2. Models: the LAR-Gen model from the pipeline folder, plus the frozen VAE and text encoder.
    try:
        pipe, model = load_model(cfg)
    except (CheckpointNotFoundError, OSError, ValueError, KeyError) as exn:
        key = "model.pretrained" if cfg.model.pretrained is not None else "model.base"
        source = cfg.model.pretrained or cfg.model.base.inpaint
        raise TrainInputError(f"{key} {source!r} cannot be loaded: {describe_error(exn)}") from None
    vae, tokenizer = pipe.vae, pipe.tokenizer
    text_encoder = text_conditions(pipe, cfg.data.resolution)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trainable = freeze_for_stage(model, cfg.stage)
    trainable_names = [n for n, _ in trainable]
    params = [p for _, p in trainable]
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opt.mixed_precision, torch.float32)
    # Frozen parts run in the mixed-precision dtype; trained parameters stay float32 (autocast).
    if weight_dtype == torch.float32:
        vae.to(device)  # diffusers warns on any dtype argument, even one that changes nothing
    elif not getattr(vae, "_keep_in_fp32_modules", None):
        nn.Module.to(vae, device, weight_dtype)  # no module must stay float32: skip diffusers' warning
    else:
        vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    model.to(device)
    model.image_encoder.to(dtype=weight_dtype)
    model.image_proj.to(dtype=weight_dtype)
    model.eval()
    if cfg.stage == 1:
        model.unet.train()
    else:
        model.refinenet.train()
        model.detail_encoder.train()
    if opt.gradient_checkpointing:
        if cfg.stage == 1:
            model.unet.enable_gradient_checkpointing()
        else:
            # The RefineNet features injected into the main UNet live only during its forward (the
            # model clears them after), so a checkpointed main UNet would recompute its
            # self-attention without them in backward: checkpoint RefineNet only.
            model.refinenet.enable_gradient_checkpointing()
            logger.info("stage 2: gradient checkpointing on RefineNet only (the main UNet keeps its activations)")
    # Speed options (`make bench-gpu` measures them); after checkpointing, which they must wrap.
    model.optimize(channels_last=opt.channels_last, compile=opt.compile)
    denoiser = ConditionedDenoiser(model, beta=cfg.model.beta, use_refine=cfg.stage == 2)
    ema = EMAModel(params, decay=opt.ema.decay) if opt.ema.enabled else None
    if ema is not None:
        ema.to(device)

    # 3. Optimizer and LR schedule (AdamW; the scheduler steps once per process per optimizer step).
    optimizer = make_optimizer(params, opt)
    lr_scheduler = get_scheduler(
        opt.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=opt.max_steps * accelerator.num_processes,
    )
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)

    # 4. Checkpoints hold only what this stage trains (the frozen rest comes from model.pretrained).
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable}
            save_file(state, os.path.join(output_dir, TRAINABLE_WEIGHTS), metadata={"format": "pt"})
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        state = load_file(os.path.join(input_dir, TRAINABLE_WEIGHTS))
        if set(state) != set(trainable_names):
            missing, extra = set(trainable_names) - set(state), set(state) - set(trainable_names)
            raise ValueError(
                f"{input_dir}: checkpoint weights do not match stage {cfg.stage}'s trainable parameters "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}); was it written by another stage?"
            )
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(state[name].to(p.device, p.dtype))
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    # 5. Resume.
    global_step = 0
    loader_state = LoaderState(num_workers=max(1, cfg.data.num_workers))
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        try:
            accelerator.load_state(str(resume_path))
            state = json.loads((resume_path / TRAINER_STATE).read_text())
            global_step = int(state["step"])
            loader_file = resume_path / f"loader_state_{accelerator.process_index}.json"
            saved = LoaderState.from_json(json.loads(loader_file.read_text()))
        except (OSError, ValueError, KeyError, RuntimeError) as exn:
            raise TrainInputError(f"--resume_from_checkpoint: {resume_path} cannot be loaded: "
                                  f"{describe_error(exn)}") from None
        if saved.num_workers == loader_state.num_workers:
            loader_state = saved
        else:  # another worker count: positions do not map; continue on a fresh, distinct stream
            logger.warning("data.num_workers changed (%d -> %d): the data order after resume is not exact",
                           saved.num_workers, loader_state.num_workers)
        if ema is not None:
            ema_state = load_file(str(resume_path / EMA_WEIGHTS))
            ema.shadow_params = [ema_state[n].to(device) for n in trainable_names]
            ema.optimization_step = int(state["ema_optimization_step"])
    elif resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {out_dir}: starting from scratch")

    # 6. Data: each process streams its own split; the loader is not passed to accelerator.prepare.
    image_size = model.image_encoder.config.image_size
    builder = TrainingExampleBuilder(
        cfg.data, tokenizer, clip_size=image_size, refine_size=cfg.data.resolution,
        image_processor=pipe.feature_extractor, refine=cfg.stage == 2,  # stage 1 has no RefineNet input
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )
    stream = QuadrupletStream(
        cfg.data, builder, seed=opt.seed + (global_step if loader_state.cursors == {} and global_step else 0),
        rank=accelerator.process_index, world_size=accelerator.num_processes, state=loader_state,
        shards=shard_urls,
    )
    batches = iter(make_dataloader(stream))

    if accelerator.is_main_process:
        accelerator.init_trackers(f"largen-stage{cfg.stage}", config=_flat("", cfg.model_dump(mode="json")))

    def save_checkpoint(step: int) -> Path:
        final = out_dir / f"checkpoint-{step}"
        tmp = out_dir / f"checkpoint-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        _write_json(tmp / f"loader_state_{accelerator.process_index}.json", loader_state.to_json())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "stage": cfg.stage, "trainable": len(trainable_names)}
            if ema is not None:
                save_file({n: t.detach().cpu().contiguous() for n, t in zip(trainable_names, ema.shadow_params)},
                          str(tmp / EMA_WEIGHTS))
                state["ema_optimization_step"] = ema.optimization_step
            _write_json(tmp / TRAINER_STATE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(out_dir)[: -cfg.checkpoint.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    # 7. The training loop.
    samples_per_step = cfg.data.batch_size * opt.gradient_accumulation_steps * accelerator.num_processes
    result = TrainResult(step=global_step)
    progress = tqdm(total=opt.max_steps, initial=global_step, desc=f"stage {cfg.stage}",
                    disable=not accelerator.is_local_main_process)
    scaling = vae.config.scaling_factor
    t_start, steps_timed = time.perf_counter(), 0
    t_run = t_start
    while global_step < opt.max_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(opt.gradient_accumulation_steps):
            try:
                batch = next(batches)
            except BaseException:
                progress.close()  # ends the bar's line, so the error that follows stands on its own
                stop_workers(batches)
                raise
            loader_state.update(batch)
            gen = step_generator(opt.seed, global_step, micro, accelerator.process_index, device)
            with accelerator.accumulate(denoiser):
                loss = compute_loss(denoiser, batch, vae, text_encoder, noise_scheduler, gen, scaling,
                                    weight_dtype, device, stage=cfg.stage, vae_latents=opt.vae_latents)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, opt.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / opt.gradient_accumulation_steps
        global_step += 1
        steps_timed += 1
        if ema is not None:
            ema.step(params)
        loss_value = accelerator.gather(step_loss[None]).mean().item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {global_step}: the loss is {loss_value}; lower optim.learning_rate?")
        result.losses.append(loss_value)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if global_step % cfg.output.log_every == 0 or global_step == opt.max_steps:
            elapsed = time.perf_counter() - t_start
            skipped = loader_state.skipped_total()
            logs = {"train/loss": loss_value, "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/samples_per_second": samples_per_step * steps_timed / max(elapsed, 1e-9),
                    **{f"data/skipped_{k}": v for k, v in skipped.items()}}
            accelerator.log(logs, step=global_step)
            t_start, steps_timed = time.perf_counter(), 0
        if global_step % cfg.checkpoint.every == 0 or global_step == opt.max_steps:
            result.checkpoints.append(str(save_checkpoint(global_step)))
        if cfg.validation.every and (global_step % cfg.validation.every == 0 or global_step == opt.max_steps):
            with ema_weights(ema, params):
                log_validation(cfg, pipe, accelerator, global_step, out_dir)
    progress.close()
    stop_workers(batches)
    total_time = time.perf_counter() - t_run
    result.samples_per_second = samples_per_step * (global_step - result.step) / max(total_time, 1e-9)

    # 8. Export: a LARGenPipeline folder with the trained (EMA when enabled) weights.
    steps_run = global_step - result.step
    result.step = global_step
    result.skipped = loader_state.skipped_total()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema, params):
            result.export_dir = str(export_pipeline(pipe, out_dir / EXPORT_DIR))
        result.wall_seconds = time.perf_counter() - t_begin
        summary = run_summary(cfg, result, steps_run, total_time)
        _write_json(out_dir / SUMMARY_FILE, summary)
        accelerator.print(format_summary(summary))
    accelerator.end_training()
    return result


def run_summary(cfg: TrainConfig, result: TrainResult, steps_run: int, loop_seconds: float) -> dict[str, Any]:
    """What `OUT/train_summary.json` holds and the end-of-run lines print: steps, loss, time, speed, export."""
    last = min(FINAL_LOSS_STEPS, len(result.losses))
    return {
        "stage": cfg.stage, "step": result.step, "max_steps": cfg.optim.max_steps, "steps_this_run": steps_run,
        "final_loss": result.final_loss(), "final_loss_steps": last, "losses": result.losses,
        "wall_seconds": round(result.wall_seconds, 3), "loop_seconds": round(loop_seconds, 3),
        "samples_per_second": round(result.samples_per_second, 3),
        "skipped": result.skipped, "export": result.export_dir,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary, a few lines for the console."""
    if summary["final_loss"] is None:
        loss = "no step run (already at max_steps)"
    else:
        loss = f"{summary['final_loss']:.4f} (mean of the last {summary['final_loss_steps']} steps)"
    return "\n".join([
        f"stage {summary['stage']} done: step {summary['step']}/{summary['max_steps']} "
        f"({summary['steps_this_run']} this run)",
        f"  final loss     {loss}",
        f"  wall time      {summary['wall_seconds']:.1f} s (training loop {summary['loop_seconds']:.1f} s)",
        f"  samples/s      {summary['samples_per_second']:.2f}",
        f"  skipped        {summary['skipped'] or 'none'}",
        f"  exported to    {summary['export']}",
    ])


class ema_weights:  # noqa: N801 - used as a context manager, reads like `with torch.no_grad()`
    """Swap the EMA weights into the trained parameters for the block (no-op without EMA)."""

    def __init__(self, ema: EMAModel | None, params: list[nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        return False


def compute_loss(denoiser: nn.Module, batch: dict[str, Any], vae, text_encoder, noise_scheduler: DDPMScheduler,
                 gen: torch.Generator, scaling: float, weight_dtype: torch.dtype, device: torch.device,
                 stage: int, vae_latents: str = "sample") -> torch.Tensor:
    """Eq. 11 for one micro-batch: || eps - eps_theta([z_t; m*; z_s], t, x_obj, s) ||^2.

    Args:
        denoiser: the (possibly DDP-wrapped) `ConditionedDenoiser`.
        gen: the micro-step's generator (timesteps, noise, VAE posterior samples).

    Returns:
        The scalar loss (float32).
    """
    pred, target, _ = predict_noise(denoiser, batch, vae, text_encoder, noise_scheduler, gen, scaling,
                                    weight_dtype, device, stage, vae_latents)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def predict_noise(denoiser: nn.Module, batch: dict[str, Any], vae, text_encoder, noise_scheduler: DDPMScheduler,
                  gen: torch.Generator, scaling: float, weight_dtype: torch.dtype, device: torch.device,
                  stage: int, vae_latents: str = "sample",
                  timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode a batch, noise it and predict: (prediction, target, latent mask m*).

    `timesteps` ([B] long) fixes the noise levels; None draws them uniformly from `gen`, as in training.
    """

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, weight_dtype)).latent_dist
        return (dist.mode() if vae_latents == "mode" else dist.sample(generator=gen)) * scaling

    with torch.no_grad():
        pixel_values = pixels_to_unit_range(batch["pixel_values"].to(device))
        mask_px = batch["mask"].to(device).float()
        bsz = pixel_values.shape[0]
        latents = encode(pixel_values)
        # SD-inpainting convention (as the pipeline): the masked image is the image with the hole at 0.
        masked_latents = encode(pixel_values * (1.0 - mask_px))
        mask = F.interpolate(mask_px.to(weight_dtype), size=latents.shape[-2:])
        added = refine_added = None
        if isinstance(text_encoder, SDXLTextConditions):
            text_embeds, added, refine_added = text_encoder(batch, device)
        else:
            text_embeds = text_encoder(batch["input_ids"].to(device))[0]
        if timesteps is None:
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device,
                                      generator=gen)
        noise = torch.randn(latents.shape, device=device, dtype=latents.dtype, generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        refine_latents = None
        if stage == 2:
            subject = encode(pixels_to_unit_range(batch["refine_pixels"].to(device)))
            subject_noise = torch.randn(subject.shape, device=device, dtype=subject.dtype, generator=gen)
            refine_latents = noise_scheduler.add_noise(subject, subject_noise, timesteps)  # same t as the scene
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    detail = batch.get("detail_clip_pixels")
    pred = denoiser(noisy, timesteps, mask, masked_latents, text_embeds, batch["clip_pixels"].to(device),
                    batch["drop_image"].to(device), refine_latents, None if detail is None else detail.to(device),
                    added, refine_added)
    return pred, target, mask


def export_pipeline(pipe: LARGenPipeline, folder: Path) -> Path:
    """Write `pipe` (with the trained weights) as a LARGenPipeline folder (temp name, then rename)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m training.train` (argparse: a usage error exits 2 with one line)."""
    parser = argparse.ArgumentParser(prog="training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training/configs/stage1.yaml or stage2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.learning_rate=5e-6 (repeatable)")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest' (the newest checkpoint-* in output.dir, if any) or a checkpoint folder")
    return parser.parse_args(argv)


def one_line(exn: BaseException) -> str:
    """An exception as one line: several config problems joined by '; ', a DataLoader worker's
    re-raised exception reduced to the original message (torch wraps it with the worker's traceback)."""
    text = str(exn).strip()
    if "Original Traceback" in text:  # torch.utils.data re-raise: the original error is the last line
        last = text.splitlines()[-1]  # "module.ErrorClass: message"
        text = last.split(": ", 1)[1] if ": " in last else last
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def quiet_libraries() -> None:
    """Keep a healthy run's console to our own lines: no per-component loading/saving bars, no
    accelerate checkpoint INFO lines (our summary says where things went)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Returns the exit status: 0, 2 for a bad input (one line `error: ...` on
    stderr), 1 when training itself fails (a non-finite loss)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        cfg = load_train_config(args.config, args.set)
        train(cfg, resume_from_checkpoint=args.resume_from_checkpoint)
    except (ConfigError, TrainInputError, ShardError) as exn:
        print(f"error: {one_line(exn)}", file=sys.stderr)
        return 2
    except NoSamplesError as exn:
        print(f"error: data.shards: the data stream stopped: {one_line(exn)}", file=sys.stderr)
        return 2
    except FloatingPointError as exn:
        print(f"error: {one_line(exn)}", file=sys.stderr)
        return 1
    return 0



@torch.no_grad()
def evaluation_loss(
    model: LARGenModel, pipe: LARGenPipeline, batches: list[dict[str, Any]], stage: int, beta: float,
    seed: int = 1234, shuffle_conditions: bool | str = False, region: str = "all", vae_latents: str = "mode",
    conditions: str = "both", timesteps: list[int] | None = None, refine: bool = True,
) -> float:
    """Mean Eq. 11 loss over fixed batches with fixed noise and timesteps (a diagnostic, no gradients).

    Args:
        shuffle_conditions: which conditions each scene takes from another sample of its batch
            (rolled by one): "text", "image" (the subject, for Assign and Refine alike), "refine"
            (only RefineNet's subject inputs, its noisy subject latents and the detail encoder's
            tokens: Assign keeps the true subject, so what changes is the detail Refine brings) or "both"; True means "both", False none. A model that uses
            a condition scores worse without it.
        region: "all" (Eq. 11 as trained) or "mask" (only the latents inside m*, where the
            conditions decide the content).
        conditions: which conditions the model is given: "both" (as the batch says), "text" (the
            null image for every sample) or "image" (the empty text for every sample). The
            single-condition modes are what the independent condition dropout trains (paper 4.5).
        timesteps: evaluate every batch at each of these timesteps, with fixed noise; None: one
            random timestep per sample, as in training. Fixed timesteps let a check look where the
            conditions decide the prediction instead of averaging over the whole schedule.
        refine: stage 2 only: False evaluates the model with Refine off (no RefineNet features).

    Returns:
        The mean loss.

    Raises:
        ValueError: unknown region, conditions or shuffle_conditions.
    """
    if region not in ("all", "mask"):
        raise ValueError(f"region must be 'all' or 'mask', got {region!r}")
    if conditions not in ("both", "text", "image"):
        raise ValueError(f"conditions must be 'both', 'text' or 'image', got {conditions!r}")
    shuffle = {True: "both", False: "none"}.get(shuffle_conditions, shuffle_conditions)
    rolled = {"none": (), "text": ("input_ids", "input_ids_2", "drop_text"),
              "image": ("clip_pixels", "refine_pixels", "drop_image"),
              "refine": ("refine_pixels",),
              "both": ("input_ids", "input_ids_2", "drop_text", "clip_pixels", "refine_pixels", "drop_image")}.get(shuffle)
    if rolled is None:
        raise ValueError(
            f"shuffle_conditions must be a bool, 'text', 'image', 'refine' or 'both', got {shuffle_conditions!r}")
    device = next(model.parameters()).device
    use_refine = stage == 2 and refine
    denoiser = ConditionedDenoiser(model, beta=beta, use_refine=use_refine)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae, scaling = pipe.vae, pipe.vae.config.scaling_factor
    empty_ids = pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
    texts = None  # built at the first batch, whose resolution SDXL's time ids need

    total, weight = 0.0, 0.0
    for i, batch in enumerate(batches):
        batch = dict(batch)
        if shuffle == "refine":  # RefineNet's whole input: its noisy subject and its detail tokens
            batch["detail_clip_pixels"] = torch.roll(batch["clip_pixels"], shifts=1, dims=0)
        for name in rolled:
            if name in batch:  # stage-1 batches carry no refine_pixels
                batch[name] = torch.roll(batch[name], shifts=1, dims=0)
        bsz = batch["input_ids"].shape[0]
        if conditions == "image":
            batch["input_ids"] = empty_ids.expand(bsz, -1)
            if "input_ids_2" in batch:
                batch["input_ids_2"] = pipe.tokenizer_2(
                    "", padding="max_length", max_length=pipe.tokenizer_2.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.expand(bsz, -1)
        if texts is None:
            texts = text_conditions(pipe, batch["pixel_values"].shape[-1])
        if conditions != "both":
            batch["drop_image"] = torch.full((bsz,), conditions == "text")
        # Fixed timesteps: the same batch at each of them, each with its own fixed noise.
        levels = [None] if timesteps is None else [torch.full((bsz,), int(t), device=device, dtype=torch.long)
                                                   for t in timesteps]
        for k, ts in enumerate(levels):
            gen = step_generator(seed, i, 0 if ts is None else k + 1, 0, device)
            pred, target, mask = predict_noise(denoiser, batch, vae, texts, scheduler, gen, scaling,
                                               vae.dtype, device, 2 if use_refine else 1, vae_latents, timesteps=ts)
            err = (pred.float() - target.float()) ** 2
            w = mask.float().expand_as(err) if region == "mask" else torch.ones_like(err)
            total += float((err * w).sum())
            weight += float(w.sum())
    return total / max(weight, 1e-12)


if __name__ == "__main__":
    sys.exit(main())
