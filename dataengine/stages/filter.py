"""Quality filters: which instances make poor training samples.

`FilterStage` (after segment) applies the paper's rule (section 5: instances too big or too small)
and lar-gen's mask-quality rules, in order, each drop counted under its reason: box area fraction
below `min_box_area_frac` (`box_too_small`) or above `max_box_area_frac` (`box_too_large`), a box
side under `min_box_side` pixels (`box_side_too_small`), an empty mask (`mask_empty`), SAM's
predicted IoU under `min_mask_score` (`mask_score_low`), SAM's stability score under
`min_mask_stability` (`mask_unstable`); then at most `max_instances` per image, best box score first
(`over_max_instances`).

`AgreementStage` (after caption) scores each regional caption against its instance crop with CLIP
(cosine similarity of the two embeddings, stored per sample as `clip_score`) and drops instances
under `filter.min_clip_score` (`caption_crop_mismatch`): a caption about another object, or a crop
whose mask/box missed the object, makes a sample that teaches the wrong thing. It does nothing in
`caption.mode: global` (no regional caption to check).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import load_clip
from dataengine.stages.base import ImageRecord, Instance, Stage, to_model


class FilterStage(Stage):
    """Instances → the instances that pass every rule."""

    name = "filter"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.fcfg = cfg.pipeline.filter

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def reason(self, inst: Instance, width: int, height: int) -> str | None:
        """Why an instance is dropped, or None to keep it."""
        x0, y0, x1, y1 = inst.box
        area_frac = (x1 - x0) * (y1 - y0) / float(width * height)
        if area_frac < self.fcfg.min_box_area_frac:
            return "box_too_small"
        if area_frac > self.fcfg.max_box_area_frac:
            return "box_too_large"
        if min(x1 - x0, y1 - y0) < self.fcfg.min_box_side:
            return "box_side_too_small"
        if inst.mask is None or not inst.mask.any():
            return "mask_empty"
        if inst.mask_score < self.fcfg.min_mask_score:
            return "mask_score_low"
        if inst.mask_stability < self.fcfg.min_mask_stability:
            return "mask_unstable"
        return None

    def process(self, records: Sequence[ImageRecord]) -> None:
        for record in records:
            height, width = record.image.shape[:2]
            kept = []
            for inst in record.instances:
                why = self.reason(inst, width, height)
                if why is None:
                    kept.append(inst)
                else:
                    record.drops[why] += 1
            # Ground emits instances best box score first, so the first ones are the best.
            if len(kept) > self.fcfg.max_instances:
                record.drops["over_max_instances"] += len(kept) - self.fcfg.max_instances
            record.instances = kept[: self.fcfg.max_instances]
            record.counts[self.name] = len(record.instances)
            if not record.instances:
                record.finish("all_instances_filtered", "filter: every instance was dropped by the filter rules")


def crop_rgb(inst: Instance) -> Image.Image:
    """The instance crop the captioner saw (box with the subject margin, RGB, background kept)."""
    return Image.fromarray(inst.subject[..., :3])


class AgreementStage(Stage):
    """Captioned instances → a CLIP caption ↔ crop score each; instances under the threshold are dropped."""

    name = "agreement"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.caption.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.min_score = cfg.pipeline.filter.min_clip_score
        self.active = cfg.pipeline.caption.mode != "global"
        if self.active:  # no CLIP in memory for a run that cannot use it
            self.model, self.processor = load_clip(cfg.profile.clip, device=self.device, dtype=self.dtype)

    def wants(self, record: ImageRecord) -> bool:
        return self.active and super().wants(record) and bool(record.instances)

    def scores(self, crops: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        """Cosine similarity of each crop's CLIP image embedding with its caption's text embedding."""
        inputs = to_model(self.processor(
            text=list(captions), images=list(crops), return_tensors="pt", padding=True, truncation=True
        ), self.device, self.dtype)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(dim=-1).float().cpu().tolist()

    def process(self, records: Sequence[ImageRecord]) -> None:
        jobs = [(record, inst) for record in records for inst in record.instances]
        values = self.scores([crop_rgb(inst) for _, inst in jobs], [inst.caption for _, inst in jobs])
        scored = {id(inst): round(float(v), 4) for (_, inst), v in zip(jobs, values)}
        for record in records:
            kept = []
            for inst in record.instances:
                inst.clip_score = scored[id(inst)]
                if inst.clip_score >= self.min_score:
                    kept.append(inst)
                else:
                    record.drops["caption_crop_mismatch"] += 1
            record.instances = kept
            record.counts[self.name] = len(kept)
            if not kept:
                record.finish("all_captions_mismatched", "agreement: no caption matched its crop (filter.min_clip_score)")
