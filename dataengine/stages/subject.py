"""Subject stage: the RGBA subject image of each instance (the image prompt of a quadruplet).

The crop is the instance box grown by `subject.margin` of its width/height on each side (clipped to
the image); its alpha channel is the SAM mask, so the background is transparent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dataengine.config import RunConfig
from dataengine.stages.base import ImageRecord, Stage


def crop_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop (x0, y0, x1, y1) of `box` grown by `margin` per side, clipped to the image, never empty."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    left = max(0, math.floor(x0 - mx))
    top = max(0, math.floor(y0 - my))
    right = min(width, max(left + 1, math.ceil(x1 + mx)))
    bottom = min(height, max(top + 1, math.ceil(y1 + my)))
    return left, top, right, bottom


class SubjectStage(Stage):
    """Instances → an RGBA crop each (box with margin, alpha = mask)."""

    name = "subject"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.margin = cfg.pipeline.subject.margin

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def process(self, records: Sequence[ImageRecord]) -> None:
        for record in records:
            height, width = record.image.shape[:2]
            for inst in record.instances:
                x0, y0, x1, y1 = crop_box(inst.box, self.margin, width, height)
                alpha = inst.mask[y0:y1, x0:x1].astype(np.uint8) * 255
                inst.subject = np.dstack([record.image[y0:y1, x0:x1], alpha])
            record.counts[self.name] = len(record.instances)
