"""Tag stage: which object tags an image holds (paper section 5: RAM; here RAM++ or CLIP zero-shot).

`ram` (default): RAM++ (`dataengine.ram`, built in) on the profile's `tagger` checkpoint; a tag is
recognised above its per-tag threshold (or `tag.ram_threshold` for every tag), ranked by
probability. `clip`, the light option: the profile's `clip` model scores the image against every
tag of `tag_vocabulary` ("a photo of a {tag}"), softmax over the vocabulary. Both then keep tags at
or above `threshold`, drop non-entity tags (sky, nature, skin, ...: not a box-able instance) and
keep the `top_k` best.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import BUILTIN_NON_ENTITY_TAGS, load_tagger, read_tag_vocabulary
from dataengine.ram.checkpoint import check_checkpoint
from dataengine.ram.files import (
    BUILTIN_TAG_LIST,
    BUILTIN_THRESHOLDS,
    TagListError,
    read_tag_list,
    read_thresholds,
)
from dataengine.ram.model import RamPlusConfig
from dataengine.ram.tagger import RamPlusTagger
from dataengine.stages.base import ImageRecord, Stage, to_model


class TagBackendError(RuntimeError):
    """The tagging backend cannot run: its bundled data files are missing or inconsistent."""


def non_entity_tags(exclude: list[str] | str) -> set[str]:
    """The exclusion list: `"builtin"` (dataengine/data/non_entity_tags.txt) or an explicit list."""
    if isinstance(exclude, str):
        return set(read_tag_vocabulary(BUILTIN_NON_ENTITY_TAGS))
    return {t.strip().lower() for t in exclude if t.strip()}


class TagStage(Stage):
    """Image → up to `top_k` entity tags with their scores."""

    name = "tag"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.tag.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.tcfg = cfg.pipeline.tag
        self.exclude = non_entity_tags(self.tcfg.exclude)
        if self.tcfg.backend == "ram":
            self.tagger = RamPlusTagger.load(cfg.profile.tagger, device=self.device, threshold=self.tcfg.ram_threshold,
                                             dtype=self.dtype)
            return
        self.tagger = None
        self.vocabulary = read_tag_vocabulary(cfg.profile.tag_vocabulary)
        # The resolved profile's tagger is its clip model when tag.backend is clip (config.Profile.resolved).
        self.model, self.processor = load_tagger(cfg.profile.tagger, device=self.device, dtype=self.dtype)
        prompts = [self.tcfg.prompt.format(tag=t) for t in self.vocabulary]
        with torch.inference_mode():
            text = self.processor(text=prompts, return_tensors="pt", padding=True).to(self.device)
            embeds = self.model.get_text_features(**text).pooler_output
        self.text_embeds = embeds / embeds.norm(dim=-1, keepdim=True)

    def process(self, records: Sequence[ImageRecord]) -> None:
        if self.tagger is not None:
            ranked = self._ram_scores(records)
        else:
            ranked = self._clip_scores(records)
        for record, scores in zip(records, ranked):
            above = [(tag, p) for tag, p in scores if p >= self.tcfg.threshold]
            entities = [(tag, p) for tag, p in above if tag not in self.exclude]
            if len(above) > len(entities):
                record.drops["non_entity_tag"] += len(above) - len(entities)
            record.tags = [tag for tag, _ in entities[: self.tcfg.top_k]]
            record.counts[self.name] = len(record.tags)
            if not record.tags:
                record.finish("no_tags", "tag: no entity tag above tag.threshold")

    def _ram_scores(self, records: Sequence[ImageRecord]) -> list[list[tuple[str, float]]]:
        ranked = self.tagger([Image.fromarray(r.image) for r in records])
        # Upstream's list is mixed case ("3D CG rendering"); the exclusion list and grounding prompts are lowercase.
        return [[(tag.lower(), p) for tag, p in tags] for tags in ranked]

    def _clip_scores(self, records: Sequence[ImageRecord]) -> list[list[tuple[str, float]]]:
        images = [Image.fromarray(r.image) for r in records]
        pixels = to_model(self.processor(images=images, return_tensors="pt")["pixel_values"], self.device, self.dtype)
        embeds = self.model.get_image_features(pixel_values=pixels).pooler_output
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * embeds @ self.text_embeds.T
        probs = logits.softmax(dim=-1).float().cpu()
        out = []
        for row in probs:
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append([(self.vocabulary[i], float(row[i])) for i in order])
        return out


def require_ram(ref: str | os.PathLike | None = None) -> None:
    """Check, before any worker starts, that RAM++ (`tag.backend: ram`) can load.

    Always checks the bundled upstream tag list and thresholds (package data) agree with the
    published model's 4,585 outputs. With `ref` (the profile's tagger), also checks its checkpoint's
    keys and shapes without loading the weights (`check_checkpoint`); a hub repo is downloaded here,
    once, so every worker reads the cache.

    Raises:
        TagBackendError: the bundled tag files are missing or inconsistent (a broken install).
        dataengine.ram.checkpoint.CheckpointError: `ref` holds no usable checkpoint (named keys), or
            the download fails.
    """
    full = RamPlusConfig.full()
    try:
        read_tag_list(BUILTIN_TAG_LIST, expected=full.num_tags)
        read_thresholds(BUILTIN_THRESHOLDS, full.num_tags, full.threshold)
    except (OSError, TagListError) as exc:
        raise TagBackendError(f"tag.backend is 'ram' but the bundled RAM++ tag files are broken: {exc}") from exc
    if ref is not None:
        check_checkpoint(ref)
