"""Masks for the editor and `/v1/mask`: SAM from clicks, or Grounding DINO boxes from words → SAM.

The models come from the data engine's loaders and a profile of pipelines.yaml (`tiny`, `full`),
so the server segments with exactly the checkpoints the engine mines with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import center_to_corners_format

from dataengine.config import load_project
from dataengine.models import load_grounding, load_segmenter
from dataengine.stages.ground import nms, phrase_spans

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"


@dataclass
class MaskResult:
    """A mask (0/255 L image at the source size), the score SAM gave it, and the boxes that prompted it."""

    mask: Image.Image
    score: float
    boxes: list[list[float]]


class NothingFound(ValueError):
    """Grounding DINO found no box for the words above the thresholds."""


class Masker:
    """Grounding DINO + SAM, loaded once.

    Args:
        grounding: Grounding DINO hub id or local folder.
        segmenter: SAM hub id or local folder.
        device: torch device.
    """

    def __init__(self, grounding: str | os.PathLike, segmenter: str | os.PathLike, device: str = "cpu") -> None:
        self.device = device
        self.dino, self.dino_processor = load_grounding(grounding, device=device)
        self.sam, self.sam_processor = load_segmenter(segmenter, device=device)
        self.max_text_len = int(self.dino.config.max_text_len)

    @classmethod
    def from_profile(cls, profile: str, config: str | os.PathLike = DEFAULT_CONFIG, device: str = "cpu") -> Masker:
        """The grounding and segmenter models of `profile` in pipelines.yaml.

        Raises:
            dataengine.typed_config.ConfigError: unknown profile, bad file, or a missing local folder.
            dataengine.models.ModelLoadError: a checkpoint cannot be loaded.
        """
        from dataengine.typed_config import ConfigError

        project = load_project(config)
        if profile not in project.profiles:
            raise ConfigError(f"--profile {profile!r} is not defined in {config}; defined: {', '.join(project.profiles)}")
        resolved = project.profiles[profile].resolved(profile)
        return cls(resolved.grounding, resolved.segmenter, device=device)

    @torch.no_grad()
    def from_points(self, image: Image.Image, points: Sequence[tuple[float, float]], labels: Sequence[int]) -> MaskResult:
        """SAM's best of three masks for clicks `points` (x, y pixels); label 1 = object, 0 = background."""
        inputs = self.sam_processor(
            images=image.convert("RGB"),
            input_points=[[[list(map(float, p)) for p in points]]],
            input_labels=[[list(map(int, labels))]],
            return_tensors="pt",
        ).to(self.device)
        out = self.sam(**inputs, multimask_output=True)
        masks, scores = self._best(out, inputs)
        return MaskResult(_to_image(masks[0]), scores[0], [])

    @torch.no_grad()
    def from_text(
        self, image: Image.Image, text: str, box_threshold: float, text_threshold: float,
        nms_iou: float = 0.5, max_boxes: int = 8,
    ) -> MaskResult:
        """Boxes for the phrases of `text` ("cat" or "cat . dog") → SAM masks, united into one.

        The `max_boxes` best-scoring boxes after non-maximum suppression (as in the data engine's
        ground stage) are kept: a prompt names an object or a few, not every weak detection.

        Raises:
            NothingFound: no box passes the thresholds.
        """
        rgb = image.convert("RGB")
        phrases = [p.strip() for p in text.replace(",", ".").split(".") if p.strip()]
        if not phrases:
            raise NothingFound(f"text {text!r} names nothing to look for; give words such as 'cat' or 'cat . dog'")
        inputs = self.dino_processor(
            images=rgb, text=" . ".join(phrases) + " .", return_tensors="pt", truncation=True, max_length=self.max_text_len
        ).to(self.device)
        outputs = self.dino(**inputs)
        probs = outputs.logits.sigmoid().float().cpu()[0]
        boxes = center_to_corners_format(outputs.pred_boxes.float().cpu())[0]
        text_len = int(inputs["attention_mask"][0].sum())
        # The same scoring as the data engine's ground stage: a box's score over the whole text, and
        # its best phrase's score.
        box_scores = probs[:, :text_len].max(dim=-1).values
        spans = phrase_spans(inputs["input_ids"][0].tolist(), len(phrases))
        text_scores = torch.stack([probs[:, span].max(dim=-1).values for span in spans], dim=-1).max(dim=-1).values
        w, h = rgb.size
        xyxy = boxes * torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        passed = (box_scores >= box_threshold) & (text_scores >= text_threshold)
        passed &= (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        idx = torch.nonzero(passed).flatten().numpy()
        if not len(idx):
            raise NothingFound(
                f"no box for {text!r} scores >= box_threshold {box_threshold:g} and text_threshold {text_threshold:g}"
            )
        keep = idx[nms(xyxy[idx].numpy(), box_scores[idx].numpy(), nms_iou)][:max_boxes]
        chosen = [[round(float(v), 2) for v in xyxy[q]] for q in keep]
        sam_inputs = self.sam_processor(images=rgb, input_boxes=[chosen], return_tensors="pt").to(self.device)
        out = self.sam(**sam_inputs, multimask_output=True)
        masks, scores = self._best(out, sam_inputs)
        return MaskResult(_to_image(masks.any(axis=0)), float(np.mean(scores)), chosen)

    def _best(self, out, inputs) -> tuple[np.ndarray, list[float]]:
        """Each prompt's mask with the best predicted IoU, at the source size: (prompts, H, W) bool, scores."""
        iou = out.iou_scores[0].float().cpu()  # (prompts, 3)
        best = iou.argmax(dim=-1)
        masks = self.sam_processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]  # (prompts, 3, H, W)
        rows = torch.arange(len(best))
        return masks[rows, best].numpy().astype(bool), [round(float(v), 4) for v in iou[rows, best]]


def _to_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
