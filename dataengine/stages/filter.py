"""Filter stage: drop instances that make poor training samples (paper section 5: too big or too small).

Rules, in order, each drop counted under its reason: box area fraction below `min_box_area_frac`
(`box_too_small`) or above `max_box_area_frac` (`box_too_large`), a box side under `min_box_side`
pixels (`box_side_too_small`), an empty mask (`mask_empty`), a mask score under `min_mask_score`
(`mask_score_low`); then at most `max_instances` per image, best box score first
(`over_max_instances`).
"""

from __future__ import annotations

from collections.abc import Sequence

from dataengine.config import RunConfig
from dataengine.stages.base import ImageRecord, Instance, Stage


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
