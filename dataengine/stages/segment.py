"""Segment stage: SAM masks from box prompts (paper section 5, "segment").

All boxes of an image go into one SAM call; SAM proposes three masks per box and the one with the
best predicted IoU is kept, with that IoU as the mask score. The image embeddings of a chunk are
computed in one batch (once per image, for all its boxes), the prompts per image.

Each kept mask also gets SAM's stability score (Kirillov et al. 2023, section 3 / appendix: the IoU
of the mask thresholded at logit +offset and at -offset; `segment_anything`'s
`calculate_stability_score`, default offset 1.0): a mask whose edge moves a lot when the threshold
moves is unreliable. The filter stage drops instances under `filter.min_mask_stability`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import load_segmenter
from dataengine.stages.base import ImageRecord, Stage, to_model

# SAM binarises its mask logits at 0 (`SamImageProcessor.post_process_masks`' mask_threshold).
MASK_THRESHOLD = 0.0


def stability_scores(logits: torch.Tensor, offset: float, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """SAM's stability score of each mask: |logits > t + offset| / |logits > t - offset|.

    Args:
        logits: (..., H, W) mask logits at the resolution the masks are used at.
        offset: the logit offset (SAM's default 1.0).
        threshold: the binarisation threshold of the logits.

    Returns:
        (...) float scores in [0, 1]; 0 where even the loose mask is empty.
    """
    inner = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros((), dtype=torch.float64)).float()


class SegmentStage(Stage):
    """Image + boxes → one boolean mask (source size), a mask score and a stability score per instance."""

    name = "segment"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.segment.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.model, self.processor = load_segmenter(cfg.profile.segmenter, device=self.device, dtype=self.dtype)
        self.offset = cfg.pipeline.segment.stability_offset

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def process(self, records: Sequence[ImageRecord]) -> None:
        prepared = [
            self.processor(
                images=Image.fromarray(r.image), input_boxes=[[inst.box for inst in r.instances]], return_tensors="pt"
            )
            for r in records
        ]
        pixels = to_model(torch.cat([p["pixel_values"] for p in prepared]), self.device, self.dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        results = []
        for i, (record, inputs) in enumerate(zip(records, prepared)):
            out = self.model(
                image_embeddings=embeddings[i : i + 1],
                input_boxes=to_model(inputs["input_boxes"], self.device, self.dtype),
                multimask_output=True,
            )
            iou = out.iou_scores[0].float().cpu()  # (boxes, 3)
            best = iou.argmax(dim=-1)
            rows = torch.arange(len(best))
            # Only the chosen mask is upscaled: a third of the memory of upscaling all three.
            low_res = out.pred_masks[0].float().cpu()[rows, best][None, :, None]  # (1, boxes, 1, 256, 256)
            logits = self.processor.post_process_masks(
                low_res, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
            )[0][:, 0]  # (boxes, H, W) at the source size
            chosen = (logits > MASK_THRESHOLD).numpy()
            stability = stability_scores(logits, self.offset).tolist()
            scores = iou[rows, best].tolist()
            results.append((record, chosen, scores, stability))
        for record, chosen, scores, stability in results:
            for inst, mask, score, stable in zip(record.instances, chosen, scores, stability):
                inst.mask = mask
                inst.mask_score = round(float(score), 4)
                inst.mask_stability = round(float(stable), 4)
            record.counts[self.name] = len(record.instances)
