"""Subject (image prompt) preprocessing: the ONE function the pipeline and the trainer both use.

Follows the official release: the subject is composited on white with its mask, cropped to the
mask's box, padded to a 1.02x white square, then resized twice: for the CLIP image encoder
(normalised with the encoder's mean/std) and for RefineNet's VAE input (in [-1, 1]). Callers that
need no RefineNet input (the pipeline without Refine, stage-1 training) pass `refine_size=None`
and skip that resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# openai/clip-vit-* preprocessing, what diffusers builds when an IP-Adapter ships no processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SQUARE_MARGIN = 1.02
MASK_THRESHOLD = 128


@dataclass
class SubjectInputs:
    """A preprocessed subject.

    Attributes:
        clip_pixels: float tensor (3, clip_size, clip_size), normalised for the CLIP image encoder.
        refine_pixels: float tensor (3, refine_size, refine_size) in [-1, 1], the VAE input for RefineNet;
            None when it was not asked for (`refine_size=None`).
        square: the white-padded square RGB image both were resized from (for inspection).
    """

    clip_pixels: torch.Tensor
    refine_pixels: torch.Tensor | None
    square: Image.Image


def _split_subject(subject) -> tuple[Image.Image, np.ndarray]:
    """(RGB image, uint8 alpha) from an RGBA image, an (image, mask) pair, or a plain RGB image (all subject)."""
    if isinstance(subject, tuple | list):
        if len(subject) != 2:
            raise ValueError(f"subject must be an RGBA image or an (image, mask) pair, got a {len(subject)}-tuple")
        image, mask = subject
        if not isinstance(image, Image.Image) or not isinstance(mask, Image.Image):
            raise TypeError("subject (image, mask) must both be PIL images")
        if image.size != mask.size:
            raise ValueError(f"subject mask is {mask.size[0]}x{mask.size[1]}, its image {image.size[0]}x{image.size[1]}")
        return image.convert("RGB"), np.asarray(mask.convert("L"))
    if not isinstance(subject, Image.Image):
        raise TypeError(f"subject must be a PIL image or an (image, mask) pair, got {type(subject).__name__}")
    if subject.mode in ("RGBA", "LA", "PA") or (subject.mode == "P" and "transparency" in subject.info):
        rgba = subject.convert("RGBA")
        return rgba.convert("RGB"), np.asarray(rgba.getchannel("A"))
    # No alpha: the whole picture is the subject.
    return subject.convert("RGB"), np.full((subject.height, subject.width), 255, dtype=np.uint8)


def subject_square(subject) -> Image.Image:
    """Composite on white, crop to the mask's box, pad to a centred 1.02x white square.

    Raises:
        ValueError: the mask is empty.
    """
    image, alpha = _split_subject(subject)
    inside = alpha >= MASK_THRESHOLD
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if len(cols) == 0:
        raise ValueError("subject mask is empty (no pixel with alpha/mask >= 128)")
    x0, y0, x1, y1 = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    # Composite only the box that is kept (the same values as compositing everything, then cropping).
    a = alpha[y0:y1, x0:x1].astype(np.float32)[..., None] / 255.0
    rgb = np.asarray(image)[y0:y1, x0:x1].astype(np.float32)
    composite = rgb * a + 255.0 * (1.0 - a)
    crop = np.clip(np.rint(composite), 0, 255).astype(np.uint8)
    h, w = crop.shape[:2]
    side = max(int(round(max(h, w) * SQUARE_MARGIN)), max(h, w))
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(Image.fromarray(crop), ((side - w) // 2, (side - h) // 2))
    return square


def _processor_stats(image_processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if image_processor is None:
        return CLIP_MEAN, CLIP_STD
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def prepare_subject(subject, clip_size: int, refine_size: int | None, image_processor=None) -> SubjectInputs:
    """Preprocess a subject for the CLIP image encoder (Assign, Refine's detail encoder) and RefineNet.

    Args:
        subject: an RGBA PIL image (alpha = subject mask), an (image, mask) pair of PIL images,
            or a plain RGB image (the whole picture is the subject).
        clip_size: side of the CLIP input (the encoder's `image_size`, 224 for ViT-H).
        refine_size: side of RefineNet's pixel input (the model resolution; the VAE brings it to
            latent resolution). None: no RefineNet input is built (`refine_pixels` is None), which
            saves the largest resize when nothing uses it.
        image_processor: the encoder's `CLIPImageProcessor`, for its mean/std; CLIP defaults when None.

    Returns:
        SubjectInputs with `clip_pixels` (3, clip_size, clip_size) and `refine_pixels`
        (3, refine_size, refine_size) in [-1, 1] (None when `refine_size` is None).

    Raises:
        TypeError / ValueError: not an image, mask size differs from the image, or empty mask.
    """
    square = subject_square(subject)
    mean, std = _processor_stats(image_processor)
    clip = _to_tensor(square.resize((clip_size, clip_size), Image.Resampling.BICUBIC))
    clip = (clip - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    refine = None
    if refine_size is not None:
        refine = _to_tensor(square.resize((refine_size, refine_size), Image.Resampling.BICUBIC)) * 2.0 - 1.0
    return SubjectInputs(clip_pixels=clip, refine_pixels=refine, square=square)
