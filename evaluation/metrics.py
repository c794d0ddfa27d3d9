"""The benchmark's metrics (paper section 6.1, DreamBooth's definitions) and background preservation.

- CLIP-I: 100 x cosine of the CLIP image embeddings of the inpainted region (the output cropped to
  the mask's box) and of the background-free subject (its cut composited on white).
- CLIP-T: 100 x cosine of the inpainted region's CLIP image embedding and the prompt's text embedding.
- DINO-I: 100 x cosine of the DINO ViT-S/16 [CLS] features of the same two images as CLIP-I.
- PSNR (dB) and the fraction of changed pixels over the background: the pixels outside the mask
  grown by `margin` pixels (LAR-Gen pastes its crop back with a feathered seam that wide).

Every embedding is L2-normalised per image, and every image is processed on its own row of a batch,
so a score does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

PSNR_CAP = 100.0  # dB for an untouched background (MSE 0): a finite number that JSON and means can hold


def on_white(subject: Image.Image) -> Image.Image:
    """An RGBA subject composited on white (what "background-free" means for an RGB encoder)."""
    if subject.mode != "RGBA":
        return subject.convert("RGB")
    canvas = Image.new("RGB", subject.size, (255, 255, 255))
    canvas.paste(subject, mask=subject.getchannel("A"))
    return canvas


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The region of `image` inside `box` (x0, y0, x1, y1; rounded outwards to whole pixels)."""
    x0, y0, x1, y1 = box
    return image.crop((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)))


def box_mask(box: Sequence[float], size: tuple[int, int]) -> Image.Image:
    """The L mask (255 inside) of `box` in an image of `size`, rounded as LAR-Gen rounds a box."""
    from inference.pipeline import box_to_mask

    return box_to_mask(box, size)


def background(mask: Image.Image, margin: int) -> np.ndarray:
    """Boolean (H, W): True outside `mask` (>= 128) grown by `margin` pixels."""
    binary = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if margin > 0:
        binary = binary.filter(ImageFilter.MaxFilter(2 * margin + 1))
    return np.asarray(binary) == 0


def background_scores(source: Image.Image, output: Image.Image, keep: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, capped at PSNR_CAP; fraction of pixels with any channel changed) over `keep`.

    Raises:
        ValueError: the images differ in size, or `keep` does not match them.
    """
    a = np.asarray(source.convert("RGB"), dtype=np.int16)
    b = np.asarray(output.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape or keep.shape != a.shape[:2]:
        raise ValueError(f"source {a.shape}, output {b.shape} and background {keep.shape} differ in size")
    if not keep.any():
        return math.nan, math.nan
    diff = (a - b)[keep]
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))
    changed = float(np.mean(np.any(diff != 0, axis=-1)))
    return psnr, changed


def cosine_100(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise 100 x cosine similarity of two (N, D) tensors."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return [float(v) * 100.0 for v in (a * b).sum(dim=-1)]


@dataclass
class Scores:
    """One output's scores (NaN where a metric does not apply)."""

    clip_i: float
    clip_t: float
    dino_i: float
    psnr_bg: float
    changed_bg: float


class Scorer:
    """CLIP (image and text towers) and DINO ViT-S/16, loaded once; scores outputs in batches.

    Args:
        clip: CLIP hub id or folder (`CLIPModel` + `CLIPProcessor`).
        dino: DINO ViT hub id or folder (`ViTModel` + image processor).
        device: torch device.
    """

    def __init__(self, clip: str | os.PathLike, dino: str | os.PathLike, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

        self.device = device
        self.clip = CLIPModel.from_pretrained(clip).eval().to(device)
        self.clip_processor = AutoProcessor.from_pretrained(clip)
        # DreamBooth's DINO-I uses the [CLS] token; the checkpoint's pooler (if any) is not part of it.
        self.dino = ViTModel.from_pretrained(dino, add_pooling_layer=False).eval().to(device)
        self.dino_processor = AutoImageProcessor.from_pretrained(dino)

    @classmethod
    def from_parts(cls, clip, clip_processor, dino, dino_processor, device: str = "cpu") -> Scorer:
        """A scorer over models already built (e.g. random weights at the real sizes, for timing)."""
        scorer = cls.__new__(cls)
        scorer.device = device
        scorer.clip, scorer.clip_processor = clip.eval().to(device), clip_processor
        scorer.dino, scorer.dino_processor = dino.eval().to(device), dino_processor
        return scorer

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) CLIP image embeddings."""
        pixels = self.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return _features(self.clip.get_image_features(pixel_values=pixels.to(self.device))).cpu()

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) CLIP text embeddings (each text padded to the model's full length, so batching cannot matter)."""
        tokens = self.clip_processor.tokenizer(
            list(texts), padding="max_length", truncation=True, return_tensors="pt",
            max_length=self.clip.config.text_config.max_position_embeddings,
        )
        return _features(self.clip.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})).cpu()

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) DINO [CLS] features."""
        pixels = self.dino_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0].cpu()

    def score(
        self,
        outputs: Sequence[Image.Image],
        sources: Sequence[Image.Image],
        boxes: Sequence[Sequence[float]],
        subjects: Sequence[Image.Image],
        prompts: Sequence[str],
        margin: int,
    ) -> list[Scores]:
        """Scores of each output against its source, box, subject (RGBA cut) and prompt."""
        regions = [crop_box(out, box) for out, box in zip(outputs, boxes)]
        refs = [on_white(s) for s in subjects]
        clip_i = cosine_100(self.clip_images(regions), self.clip_images(refs))
        clip_t = cosine_100(self.clip_images(regions), self.clip_texts(prompts))
        dino_i = cosine_100(self.dino_images(regions), self.dino_images(refs))
        results = []
        for k, (out, src, box) in enumerate(zip(outputs, sources, boxes)):
            keep = background(box_mask(box, src.size), margin)
            psnr, changed = background_scores(src, out, keep)
            results.append(Scores(clip_i[k], clip_t[k], dino_i[k], psnr, changed))
        return results


def _features(out) -> torch.Tensor:
    # transformers >= 5 may return a model output holding the projected embeddings instead of a tensor.
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


def seam_margin(size: tuple[int, int]) -> int:
    """Background margin for a scene of `size`: 2% of its longer side, at least 2 px (LAR-Gen's paste seam)."""
    return max(2, round(0.02 * max(size)))
