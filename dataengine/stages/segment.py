"""Segment stage: SAM masks from box prompts (paper section 5, "segment").

All boxes of an image go into one SAM call; SAM proposes three masks per box and the one with the
best predicted IoU is kept, with that IoU as the mask score. The image embeddings of a chunk are
computed in one batch, the prompts per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import load_segmenter
from dataengine.stages.base import ImageRecord, Stage


class SegmentStage(Stage):
    """Image + boxes → one boolean mask (source size) and a mask score per instance."""

    name = "segment"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.segment.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.model, self.processor = load_segmenter(cfg.profile.segmenter, device=self.device)

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def process(self, records: Sequence[ImageRecord]) -> None:
        prepared = [
            self.processor(
                images=Image.fromarray(r.image), input_boxes=[[inst.box for inst in r.instances]], return_tensors="pt"
            )
            for r in records
        ]
        pixels = torch.cat([p["pixel_values"] for p in prepared]).to(self.device)
        embeddings = self.model.get_image_embeddings(pixels)
        results = []
        for i, (record, inputs) in enumerate(zip(records, prepared)):
            out = self.model(
                image_embeddings=embeddings[i : i + 1],
                input_boxes=inputs["input_boxes"].to(self.device),
                multimask_output=True,
            )
            iou = out.iou_scores[0].float().cpu()  # (boxes, 3)
            best = iou.argmax(dim=-1)
            masks = self.processor.post_process_masks(
                out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0]  # (boxes, 3, H, W) bool
            chosen = masks[torch.arange(len(best)), best].numpy()
            scores = iou[torch.arange(len(best)), best].tolist()
            results.append((record, chosen, scores))
        for record, chosen, scores in results:
            for inst, mask, score in zip(record.instances, chosen, scores):
                inst.mask = mask
                inst.mask_score = round(float(score), 4)
            record.counts[self.name] = len(record.instances)
