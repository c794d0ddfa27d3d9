"""The schema of pipelines.yaml: model profiles and named mining pipelines, loaded into typed objects.

`load_run_config(path, pipeline, profile, overrides)` is what the engine calls: it validates the
whole file, applies `--set` overrides, picks one pipeline, resolves its profile's model refs
(a hub id, or a local folder that must exist) and returns a `RunConfig`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dataengine.ram.files import checkpoint_in
from dataengine.typed_config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    read_yaml,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODELS = ".cache/tiny-models"
TINY_PLACEHOLDER = "{tiny_models}"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def tiny_models_dir() -> Path:
    """The tiny zoo folder: `$LARGEN_TINY_MODELS`, else `.cache/tiny-models` in the repo."""
    env = os.environ.get("LARGEN_TINY_MODELS")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT / DEFAULT_TINY_MODELS)


def is_local_ref(ref: str) -> bool:
    """A model ref is a local folder when it exists or is written as a path; otherwise a hub id."""
    if ref.startswith(("/", ".", "~", TINY_PLACEHOLDER)) or not HUB_ID.match(ref):
        return True
    return Path(ref).expanduser().exists()


def expand_ref(ref: str) -> str:
    """Expand `{tiny_models}` and `~` in a local ref; hub ids are returned unchanged."""
    if not is_local_ref(ref):
        return ref
    ref = ref.replace(TINY_PLACEHOLDER, str(tiny_models_dir()))
    return str(Path(ref).expanduser())


# --------------------------------------------------------------------------- profiles


class ImagePromptRef(StrictModel):
    """An IP-Adapter-Plus checkpoint, laid out like the published `h94/IP-Adapter` repo."""

    repo: str
    subfolder: str = "models"
    weight_name: str = "ip-adapter-plus_sd15.safetensors"
    image_encoder: str = "models/image_encoder"


class Profile(StrictModel):
    """Which checkpoint serves each model role (hub id or local folder)."""

    tagger: str = Field(
        description="RAM++ checkpoint (tag.backend: ram): a hub repo holding ram_plus_swin_large_14m.pth, "
        "a .pth file, or a folder holding one or a converted model (python -m dataengine.ram convert)"
    )
    tag_vocabulary: str = "builtin"
    grounding: str
    segmenter: str
    captioner: str
    clip: str = Field(description="CLIP checkpoint that scores caption <-> instance crop agreement (filter.min_clip_score)")
    inpaint: str
    image_prompt: ImagePromptRef

    def resolved(self, name: str, tag_backend: str = "ram") -> Profile:
        """A copy with local refs expanded and checked to exist.

        In the copy, `tagger` is the checkpoint the run tags with, so provenance and model checks
        need not know the backend: the RAM++ `tagger` for `tag.backend: ram`, the profile's `clip`
        model (scoring `tag_vocabulary` zero-shot) for `tag.backend: clip`.

        Args:
            name: the profile's name (for messages).
            tag_backend: the pipeline's `tag.backend`.

        Raises:
            ConfigError: a local model path does not exist, or holds no RAM++ checkpoint.
        """
        data = self.model_dump()
        if tag_backend == "ram":
            data["tagger"] = _checked_ram(f"profiles.{name}.tagger", data["tagger"])
        for role in ("grounding", "segmenter", "captioner", "clip", "inpaint"):
            data[role] = _checked(f"profiles.{name}.{role}", data[role])
        if tag_backend == "clip":
            data["tagger"] = data["clip"]
        if data["tag_vocabulary"] != "builtin":
            data["tag_vocabulary"] = _checked(f"profiles.{name}.tag_vocabulary", data["tag_vocabulary"], file=True)
        data["image_prompt"]["repo"] = _checked(f"profiles.{name}.image_prompt.repo", data["image_prompt"]["repo"])
        return Profile.model_validate(data)


def _checked(key: str, ref: str, file: bool = False) -> str:
    expanded = expand_ref(ref)
    if is_local_ref(ref) or file:
        path = Path(expanded)
        if not (path.is_file() if file else path.is_dir()):
            hint = " (run `make tiny-models` to generate the tiny zoo)" if TINY_PLACEHOLDER in ref else ""
            kind = "file" if file else "model folder"
            raise ConfigError(f"{key}: local {kind} {expanded!r} does not exist{hint}")
    return expanded


def _checked_ram(key: str, ref: str) -> str:
    """A RAM++ ref: a hub id as is, or a local .pth file or a folder `checkpoint_in` finds one in."""
    expanded = expand_ref(ref)
    if is_local_ref(ref) and checkpoint_in(expanded) is None:
        hint = " (run `make tiny-models` to generate the tiny zoo)" if TINY_PLACEHOLDER in ref else ""
        problem = "does not exist"
        if Path(expanded).is_dir():
            problem = "holds no RAM++ checkpoint (a .pth file, or model.safetensors + config.json)"
        raise ConfigError(f"{key}: local file or folder {expanded!r} {problem}{hint}")
    return expanded


# --------------------------------------------------------------------------- pipeline stages


class Resources(StrictModel):
    """How a stage runs under Ray: rows per batch, replicas (actors), and per-replica resources."""

    batch_size: int = Field(8, ge=1)
    replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)


class InputSpec(StrictModel):
    """One input: a folder of images, WebDataset tars, or a parquet/CSV table of image paths."""

    kind: Literal["images", "webdataset", "table"]
    path: str = Field(description="folder, tar file/brace pattern/glob, or table file; local or fsspec URL")
    image_column: str = "image"
    image_field: str | None = Field(None, description="webdataset: image extension; default: first of jpg/png/webp")
    images_per_shard: int = Field(64, ge=1)


class TagConfig(StrictModel):
    backend: Literal["clip", "ram"] = Field(
        "ram", description="ram: RAM++ (profile tagger), the paper's tagger; clip: zero-shot with the profile's clip"
    )
    threshold: float = Field(0.2, ge=0, le=1)
    ram_threshold: float | None = Field(
        None, ge=0, le=1, description="RAM++: one threshold for every tag instead of the per-tag thresholds"
    )
    top_k: int = Field(5, ge=1)
    exclude: list[str] | Literal["builtin"] = "builtin"
    prompt: str = Field("a photo of a {tag}", description="CLIP text template for each vocabulary tag")
    resources: Resources = Resources()


class GroundConfig(StrictModel):
    box_threshold: float = Field(0.25, ge=0, le=1)
    text_threshold: float = Field(0.2, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    resources: Resources = Resources()


class SegmentConfig(StrictModel):
    stability_offset: float = Field(
        1.0, gt=0, description="logit offset of SAM's stability score: IoU of the mask at +offset and -offset (SAM: 1.0)"
    )
    resources: Resources = Resources()


class FilterConfig(StrictModel):
    min_box_area_frac: float = Field(0.01, ge=0, le=1)
    max_box_area_frac: float = Field(0.8, ge=0, le=1)
    min_box_side: int = Field(16, ge=0)
    min_mask_score: float = Field(0.5, ge=0, le=1, description="SAM's predicted IoU of the chosen mask")
    min_mask_stability: float = Field(
        0.85, ge=0, le=1, description="SAM's stability score (segment.stability_offset); SAM's own generator uses 0.95"
    )
    min_clip_score: float = Field(
        0.2, ge=-1, le=1, description="CLIP cosine similarity of the regional caption and the instance crop"
    )
    max_instances: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_box_area_frac > self.max_box_area_frac:
            raise ValueError(
                f"min_box_area_frac ({self.min_box_area_frac}) must not exceed max_box_area_frac ({self.max_box_area_frac})"
            )
        return self


class SubjectConfig(StrictModel):
    margin: float = Field(0.1, ge=0, le=1, description="box margin as a fraction of the box side")


class CaptionConfig(StrictModel):
    mode: Literal["regional", "global", "both"] = Field(
        "regional",
        description="regional: the instance crop (the paper); global: the whole image (the paper's Table 2 "
        "baseline); both: each sample's json holds both, the trainer picks one (data.caption)",
    )
    prompt: str = "Describe the {tag} in this image in one short sentence."
    global_prompt: str = "Describe this image in one short sentence."
    max_new_tokens: int = Field(40, ge=1)
    min_words: int = Field(2, ge=1)
    resources: Resources = Resources()

    @field_validator("prompt")
    @classmethod
    def _names_tag(cls, v: str) -> str:
        if "{tag}" not in v:
            raise ValueError("the caption prompt must contain the placeholder {tag}")
        return v


class DedupConfig(StrictModel):
    """Near-duplicate source images across the whole run (perceptual hash; the first in input order is kept)."""

    enabled: bool = True
    max_distance: int = Field(
        4, ge=0, le=32, description="Hamming distance (of 64 bits) of two pHashes at or below which images are duplicates"
    )


class OutputConfig(StrictModel):
    dir: str = "mined/{pipeline}"
    max_side: int = Field(1024, ge=64)
    jpeg_quality: int = Field(95, ge=50, le=100)


class LimitsConfig(StrictModel):
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb guard")
    max_bytes: int = Field(100_000_000, ge=1)
    min_side: int = Field(8, ge=1, description="images with a shorter side are recorded as failed")


class EngineConfig(StrictModel):
    """Where the stages run: `ray` (Ray Data; RAY_ADDRESS or an embedded local Ray) or `local` (one process)."""

    backend: Literal["ray", "local"] = "ray"
    seed: int = Field(0, description="torch seed set in every stage before its model runs")
    layout: Literal["per_stage", "fused"] = Field(
        "per_stage",
        description="per_stage: one actor pool per model stage (each stage's resources); fused: one pool "
        "whose replicas each load every model and run whole shards (`fused` resources)",
    )
    fused: Resources = Resources(replicas=2, num_cpus=1.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the models' weights and inputs: auto = bfloat16 on a CUDA GPU (half the memory, tensor cores), "
        "float32 on CPU",
    )


class PipelineConfig(StrictModel):
    """A named mining pipeline: inputs, stage settings, output."""

    description: str = ""
    profile: str = "full"
    inputs: list[InputSpec] = Field(min_length=1)
    dedup: DedupConfig = DedupConfig()
    tag: TagConfig = TagConfig()
    ground: GroundConfig = GroundConfig()
    segment: SegmentConfig = SegmentConfig()
    filter: FilterConfig = FilterConfig()
    subject: SubjectConfig = SubjectConfig()
    caption: CaptionConfig = CaptionConfig()
    output: OutputConfig = OutputConfig()
    limits: LimitsConfig = LimitsConfig()
    engine: EngineConfig = EngineConfig()


class ProjectConfig(StrictModel):
    """The whole of pipelines.yaml."""

    profiles: dict[str, Profile] = Field(min_length=1)
    pipelines: dict[str, PipelineConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _profiles_exist(self) -> ProjectConfig:
        for name, pipe in self.pipelines.items():
            if pipe.profile not in self.profiles:
                raise ValueError(
                    f"pipeline {name!r} uses profile {pipe.profile!r}; defined profiles: {', '.join(self.profiles)}"
                )
        return self


class RunConfig(StrictModel):
    """One pipeline, ready to run: its settings and its resolved profile."""

    pipeline_name: str
    profile_name: str
    pipeline: PipelineConfig
    profile: Profile

    def config_hash(self) -> str:
        """A short stable hash of everything that shapes the output (written into every sample).

        Where the images come from and go to (inputs, output folder), the description, the engine
        (Ray or one process) and the placement of stages (replicas, CPUs, GPUs) do not change a
        sample, so they are left out: the same images mined into two folders, on Ray or in one
        process, give identical bytes.
        """
        data = self.model_dump(mode="json")
        for key in ("inputs", "description", "engine"):
            data["pipeline"].pop(key, None)
        data["pipeline"]["output"].pop("dir", None)
        for section in data["pipeline"].values():
            if isinstance(section, dict) and "resources" in section:
                # Placement (replicas, CPUs, GPUs) does not change a result; the batch size may.
                section["resources"] = {"batch_size": section["resources"]["batch_size"]}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_project(path: str | Path, overrides: Iterable[str] = ()) -> ProjectConfig:
    """Parse and validate the whole pipelines.yaml (absolute `--set` keys only)."""
    data = apply_overrides(read_yaml(path), overrides)
    return validate(ProjectConfig, data, source=str(path))


def load_run_config(
    path: str | Path,
    pipeline: str,
    profile: str | None = None,
    overrides: Iterable[str] = (),
) -> RunConfig:
    """Load pipelines.yaml, apply overrides (relative to the pipeline unless absolute), pick one pipeline.

    Raises:
        ConfigError: unknown pipeline/profile, a bad key or value, or a missing local model path.
    """
    raw = read_yaml(path)
    pipelines = raw.get("pipelines") or {}
    if not isinstance(pipelines, dict) or pipeline not in pipelines:
        names = (", ".join(pipelines) if isinstance(pipelines, dict) else "") or "none"
        raise ConfigError(f"{path}: pipeline {pipeline!r} is not defined; defined pipelines: {names}")
    data = apply_overrides(raw, overrides, base=["pipelines", pipeline])
    project = validate(ProjectConfig, data, source=str(path))
    pipe = project.pipelines[pipeline]
    profile_name = profile or pipe.profile
    if profile_name not in project.profiles:
        raise ConfigError(
            f"{path}: profile {profile_name!r} is not defined; defined profiles: {', '.join(project.profiles)}"
        )
    resolved = project.profiles[profile_name].resolved(profile_name, tag_backend=pipe.tag.backend)
    return RunConfig(pipeline_name=pipeline, profile_name=profile_name, pipeline=pipe, profile=resolved)
