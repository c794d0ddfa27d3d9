"""Ground stage: Grounding DINO boxes for the image's tags (paper section 5, "localize").

The text prompt is the image's tags joined as "tag1 . tag2 .". Each query box gets the tag whose
tokens it matches best (text score: the best token probability inside that tag's phrase), a box
score (its best token probability over the whole prompt, as in Grounding DINO), and is kept when
box score >= `box_threshold` and text score >= `text_threshold`. Class-agnostic NMS at `nms_iou`
then removes duplicates across tags.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import center_to_corners_format

from dataengine.config import Resources, RunConfig
from dataengine.models import load_grounding
from dataengine.stages.base import ImageRecord, Instance, Stage, to_model

# Grounding DINO splits phrases on bert-base-uncased special ids: [CLS], [SEP], [PAD], ".", "?".
SEPARATOR_IDS = {101, 102, 0, 1012, 1029}


def phrase_spans(input_ids: list[int], n_phrases: int) -> list[list[int]]:
    """Token positions of each phrase of "p1 . p2 . ...", in order.

    Raises:
        ValueError: the tokenised prompt holds fewer phrases than tags (it was truncated).
    """
    spans: list[list[int]] = []
    current: list[int] = []
    for pos, tok in enumerate(input_ids):
        if tok in SEPARATOR_IDS:
            if current:
                spans.append(current)
                current = []
        else:
            current.append(pos)
    if current:
        spans.append(current)
    if len(spans) < n_phrases:
        raise ValueError(
            f"the grounding prompt holds {len(spans)} phrase(s) for {n_phrases} tags; lower tag.top_k "
            "(the prompt is longer than the model's max_text_len)"
        )
    return spans[:n_phrases]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Class-agnostic non-maximum suppression; kept indices, best score first (ties: lower index first)."""
    if len(boxes) == 0:
        return []
    xywh = [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes]
    keep = cv2.dnn.NMSBoxes(xywh, [float(s) for s in scores], score_threshold=0.0, nms_threshold=float(iou))
    keep = [int(i) for i in np.asarray(keep).reshape(-1)]
    return sorted(keep, key=lambda i: (-float(scores[i]), i))


class GroundStage(Stage):
    """Image + tags → instances (tag, box, box score, text score)."""

    name = "ground"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.ground.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.gcfg = cfg.pipeline.ground
        self.model, self.processor = load_grounding(cfg.profile.grounding, device=self.device, dtype=self.dtype)
        self.max_text_len = int(self.model.config.max_text_len)

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.tags)

    def process(self, records: Sequence[ImageRecord]) -> None:
        images = [Image.fromarray(r.image) for r in records]
        texts = [" . ".join(r.tags) + " ." for r in records]
        inputs = to_model(self.processor(
            images=images, text=texts, return_tensors="pt", padding=True, truncation=True,
            max_length=self.max_text_len,
        ), self.device, self.dtype)
        outputs = self.model(**inputs)
        probs = outputs.logits.sigmoid().float().cpu()  # (B, queries, max_text_len); -inf past the text
        boxes = center_to_corners_format(outputs.pred_boxes.float().cpu())
        found = []
        for i, record in enumerate(records):
            height, width = record.image.shape[:2]
            ids = inputs["input_ids"][i].tolist()
            spans = phrase_spans(ids, len(record.tags))
            text_len = int(inputs["attention_mask"][i].sum())
            box_scores = probs[i, :, :text_len].max(dim=-1).values
            tag_scores = torch.stack([probs[i][:, span].max(dim=-1).values for span in spans], dim=-1)
            text_scores, tag_index = tag_scores.max(dim=-1)
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            xyxy = (boxes[i] * scale).clamp(min=0)
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(max=width)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(max=height)
            passed = (box_scores >= self.gcfg.box_threshold) & (text_scores >= self.gcfg.text_threshold)
            passed &= (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
            idx = torch.nonzero(passed).flatten().numpy()
            keep = idx[nms(xyxy[idx].numpy(), box_scores[idx].numpy(), self.gcfg.nms_iou)] if len(idx) else idx
            instances = [
                Instance(
                    tag=record.tags[int(tag_index[q])],
                    box=[round(float(v), 2) for v in xyxy[q]],
                    box_score=round(float(box_scores[q]), 4),
                    text_score=round(float(text_scores[q]), 4),
                )
                for q in keep
            ]
            found.append((record, instances, int(passed.sum()) - len(instances)))
        for record, instances, suppressed in found:
            record.instances = instances
            if suppressed:
                record.drops["nms_duplicate"] += suppressed
            record.counts[self.name] = len(instances)
            if not instances:
                record.finish("no_boxes", "ground: no box above ground.box_threshold / text_threshold")
