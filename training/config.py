"""The trainer's typed stage configs (training/configs/stage1.yaml, stage2.yaml), validated like pipelines.yaml.

`load_train_config(path, overrides)` reads a stage YAML, applies `--set a.b=c` overrides and
validates it into a `TrainConfig` through `dataengine.typed_config`, so an unknown key, a wrong
type or a value out of range fails at load with a message naming the dotted key. Paths may use
`${ENV_VAR}` (e.g. `${LARGEN_TINY_MODELS}`) and `~`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dataengine.typed_config import ConfigError, StrictModel, apply_overrides, read_yaml, validate

_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_path(value: str) -> str:
    """Expand `${VAR}` and `~` in a path or URL.

    Raises:
        ConfigError: the value names an environment variable that is not set.
    """
    expanded = os.path.expandvars(value)
    missing = _UNSET_VAR.findall(expanded)
    if missing:
        raise ConfigError(f"{value!r}: environment variable(s) {', '.join(missing)} not set")
    return os.path.expanduser(expanded)


class BaseModels(StrictModel):
    """The untrained starting point of stage 1: SD-1.5-inpainting + IP-Adapter-Plus (hub ids or folders).

    The backbone follows `inpaint`: an SDXL-inpainting pipeline (`stage1-sdxl.yaml`) trains SDXL
    LAR-Gen, with the IP-Adapter-Plus SDXL ViT-H weights named by the other keys.
    """

    inpaint: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"
    image_prompt: str = Field("h94/IP-Adapter", description="IP-Adapter repo or folder in its layout")
    subfolder: str = "models"
    weight_name: str = "ip-adapter-plus_sd15.safetensors"
    image_encoder: str = "image_encoder"


class ModelConfig(StrictModel):
    """Where the weights come from and how the image condition is mixed in (give `pretrained` or `base`)."""

    pretrained: str | None = Field(
        None, description="a LARGenPipeline folder (or hub id): e.g. the stage-1 export for stage 2"
    )
    base: BaseModels | None = Field(None, description="build the model from its bases (stage 1 from scratch)")
    beta: float = Field(ge=0, le=2, description="image-condition strength in Z + beta * Z' (paper: 1 then 0.3)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.pretrained is None) == (self.base is None):
            raise ValueError("give exactly one of model.pretrained (a LARGenPipeline folder) and model.base")
        return self


class ZoomConfig(StrictModel):
    """Random zoom-in crop around the instance: its box scaled by U(min, max), made square, resized."""

    probability: float = Field(1.0, ge=0, le=1, description="else the whole image is padded to a square")
    min_expansion: float = Field(1.1, ge=1.0)
    max_expansion: float = Field(2.0, ge=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> ZoomConfig:
        if self.min_expansion > self.max_expansion:
            raise ValueError(f"min_expansion ({self.min_expansion}) must not exceed max_expansion ({self.max_expansion})")
        return self


class MaskAugConfig(StrictModel):
    """Which mask the model sees: the precise mask, its box, or the mask dilated (relative weights)."""

    precise: float = Field(0.5, ge=0)
    box: float = Field(0.25, ge=0)
    dilated: float = Field(0.25, ge=0)
    max_dilation: float = Field(0.06, gt=0, le=0.5, description="largest dilation radius, fraction of the side")

    @model_validator(mode="after")
    def _some_weight(self) -> MaskAugConfig:
        if self.precise + self.box + self.dilated <= 0:
            raise ValueError("at least one of precise / box / dilated must have a positive weight")
        return self


class DropoutConfig(StrictModel):
    """Condition dropout for classifier-free guidance (paper 4.5): each condition is dropped independently.

    Per sample, the caption is replaced by the empty text with probability `text` and, independently,
    the subject by the null image with probability `image`; both are dropped with `text * image`.
    The defaults (0.2, 0.2) drop each condition in 20 % of samples and both in 4 %, close to the 5 %
    unconditional share of IP-Adapter's recipe, so the (empty text, null image) branch that CFG
    subtracts is trained as often as before, while each single-condition mode is trained more.
    """

    text: float = Field(0.2, ge=0, le=1, description="probability of replacing the caption by the empty text")
    image: float = Field(0.2, ge=0, le=1, description="probability (independent of text) of the null subject image")


class DataConfig(StrictModel):
    """The streaming quadruplet loader (training/data.py)."""

    shards: list[str] = Field(
        min_length=1, description="tar paths, brace patterns ({000000..000099}.tar) or fsspec URLs"
    )
    resolution: int = Field(512, ge=16, description="square training resolution in pixels (multiple of 8)")
    batch_size: int = Field(8, ge=1, description="samples per device per micro-step")
    num_workers: int = Field(2, ge=0)
    resampled: bool = Field(True, description="draw shards with replacement (infinite; multi-GPU); else epochs")
    shuffle_buffer: int = Field(1000, ge=1)
    shuffle_initial: int = Field(100, ge=1)
    max_consecutive_failures: int = Field(1000, ge=1, description="stop when this many samples in a row fail")
    caption: Literal["regional", "global"] = Field(
        "regional",
        description="which caption conditions the text: the instance's (the paper) or the whole image's (its "
        "Table 2 baseline; needs shards mined with caption.mode global or both)",
    )
    zoom: ZoomConfig = ZoomConfig()
    mask: MaskAugConfig = MaskAugConfig()
    dropout: DropoutConfig = DropoutConfig()

    @field_validator("shards", mode="before")
    @classmethod
    def _as_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE factor), got {v}")
        return v


class EMAConfig(StrictModel):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)


class OptimConfig(StrictModel):
    """Optimisation: AdamW, warmup, accumulation, precision."""

    max_steps: int = Field(20_000, ge=1, description="optimizer steps")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw (torch) or adamw8bit (bitsandbytes' 8-bit states: a quarter of AdamW's "
        "state memory; needs `pip install bitsandbytes` and a CUDA GPU)",
    )
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(500, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = Field(False, description="channels-last convolution weights in the UNet and RefineNet "
                                "(faster on tensor-core GPUs)")
    compile: bool = Field(False, description="torch.compile the UNet and RefineNet in place (GPU; the first "
                          "steps compile)")
    seed: int = 0
    vae_latents: Literal["sample", "mode"] = Field(
        "sample", description="encode images with a posterior sample (SD practice) or its mode (deterministic)"
    )
    ema: EMAConfig = EMAConfig()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false


class CheckpointConfig(StrictModel):
    every: int = Field(1000, ge=1, description="save checkpoint-{step} every N optimizer steps")
    keep: int = Field(3, ge=1, description="keep the last N checkpoints")


class ValidationConfig(StrictModel):
    """Validation grid (source | mask | subject | output, one row per sample and mode)."""

    every: int = Field(1000, ge=0, description="every N steps; 0 disables")
    shards: list[str] | None = Field(None, description="default: data.shards")
    samples: int = Field(2, ge=1)
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0)
    seed: int = 0

    @field_validator("shards", mode="before")
    @classmethod
    def _as_list(cls, v):
        return [v] if isinstance(v, str) else v


class OutputConfig(StrictModel):
    dir: str = Field(description="checkpoints, logs, validation grids and the export go here")
    log_every: int = Field(10, ge=1, description="tensorboard scalars every N steps")


class TrainConfig(StrictModel):
    """One stage of LAR-Gen training."""

    stage: Literal[1, 2]
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    output: OutputConfig

    def resolved(self) -> TrainConfig:
        """A copy with `${VAR}` and `~` expanded in every path and URL.

        Raises:
            ConfigError: a path names an unset environment variable.
        """
        data = self.model_dump()
        if data["model"]["pretrained"]:
            data["model"]["pretrained"] = expand_path(data["model"]["pretrained"])
        if data["model"]["base"]:
            for key in ("inpaint", "image_prompt"):
                data["model"]["base"][key] = expand_path(data["model"]["base"][key])
        data["data"]["shards"] = [expand_path(s) for s in data["data"]["shards"]]
        if data["validation"]["shards"]:
            data["validation"]["shards"] = [expand_path(s) for s in data["validation"]["shards"]]
        data["output"]["dir"] = expand_path(data["output"]["dir"])
        return TrainConfig.model_validate(data)


def load_train_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a stage YAML, apply `--set` overrides (dotted keys), validate and expand paths.

    Raises:
        ConfigError: a missing, unreadable or binary file, bad YAML, an unknown key, a bad value,
            or an unset env var.
    """
    data = apply_overrides(read_yaml(path), overrides)
    return validate(TrainConfig, data, source=str(path)).resolved()
