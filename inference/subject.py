"""Subject (image prompt) preprocessing: the ONE function the pipeline and the trainer both use.

Follows the official release: the subject is composited on white with its mask, cropped to the
mask's box, padded to a 1.02x white square, then resized twice: for the CLIP image encoder
(PIL bicubic, normalised with the encoder's mean/std) and for RefineNet's VAE input (in [-1, 1];
`inference.zoom.resize_square`, the resize of the source crop). Callers that
need no RefineNet input (the pipeline without Refine, stage-1 training) pass `refine_size=None`
and skip that resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from inference.zoom import resize_square

# openai/clip-vit-* preprocessing, what diffusers builds when an IP-Adapter ships no processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SQUARE_MARGIN = 1.02
MASK_THRESHOLD = 128
# PIL's two-step downscale (an integer box reduction, then bicubic) for squares at least this many
# times larger than the target: a 3000 px subject square shrinks 2-5x faster, close to the one-step
# bicubic (the bound is measured in tests/inference/test_subject_zoom.py).
REDUCING_GAP = 2.0


@dataclass
class SubjectInputs:
    """A preprocessed subject.

    Attributes:
        clip_pixels: float tensor (3, clip_size, clip_size), normalised for the CLIP image encoder.
        refine_pixels: float tensor (3, refine_size, refine_size) in [-1, 1], the VAE input for RefineNet
            (uint8 0..255 with `refine_uint8`); None when it was not asked for (`refine_size=None`).
        square: the white-padded square RGB image both were resized from (for inspection).
    """

    clip_pixels: torch.Tensor
    refine_pixels: torch.Tensor | None
    square: Image.Image


def _split_subject(subject) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, alpha HxW uint8) from an RGBA image, an (image, mask) pair, or a plain RGB image (all subject).

    `pixels` is HxWx3 RGB, or the whole HxWx4 RGBA array (its first three channels are the colour):
    splitting a large RGBA picture costs more than the compositing itself.
    """
    if isinstance(subject, tuple | list):
        if len(subject) != 2:
            raise ValueError(f"subject must be an RGBA image or an (image, mask) pair, got a {len(subject)}-tuple")
        image, mask = subject
        if not isinstance(image, Image.Image) or not isinstance(mask, Image.Image):
            raise TypeError("subject (image, mask) must both be PIL images")
        if image.size != mask.size:
            raise ValueError(f"subject mask is {mask.size[0]}x{mask.size[1]}, its image {image.size[0]}x{image.size[1]}")
        return np.asarray(image.convert("RGB")), np.asarray(mask.convert("L"))
    if not isinstance(subject, Image.Image):
        raise TypeError(f"subject must be a PIL image or an (image, mask) pair, got {type(subject).__name__}")
    if subject.mode in ("RGBA", "LA", "PA") or (subject.mode == "P" and "transparency" in subject.info):
        rgba = np.asarray(subject if subject.mode == "RGBA" else subject.convert("RGBA"))
        return rgba, cv2.extractChannel(rgba, 3)
    # No alpha: the whole picture is the subject.
    return np.asarray(subject.convert("RGB")), np.full((subject.height, subject.width), 255, dtype=np.uint8)


def subject_square(subject) -> Image.Image:
    """Composite on white, crop to the mask's box, pad to a centred 1.02x white square.

    Raises:
        ValueError: the mask is empty.
    """
    return Image.fromarray(_square_array(subject))


def _square_array(subject) -> np.ndarray:
    """`subject_square` as an HxWx3 uint8 array."""
    rgb, alpha = _split_subject(subject)
    # Box of alpha >= 128 (OpenCV's bounding box of the non-zero pixels of the thresholded alpha).
    x0, y0, bw, bh = cv2.boundingRect(cv2.threshold(alpha, MASK_THRESHOLD - 1, 255, cv2.THRESH_BINARY)[1])
    if bw == 0 or bh == 0:
        raise ValueError("subject mask is empty (no pixel with alpha/mask >= 128)")
    x1, y1 = x0 + bw, y0 + bh
    # Composite only the box that is kept, on white: rgb * a + 255 * (1 - a) = 255 - (255 - rgb) * a,
    # in OpenCV's uint8 arithmetic (rounded to nearest; (255 - rgb) * alpha / 255 is never a tie, so
    # this equals the float formula rounded, bit for bit) at a fraction of numpy's float cost.
    a = cv2.cvtColor(alpha[y0:y1, x0:x1], cv2.COLOR_GRAY2RGB)
    box = rgb[y0:y1, x0:x1]
    inverse = cv2.bitwise_not(cv2.cvtColor(box, cv2.COLOR_RGBA2RGB) if box.shape[2] == 4 else box)
    crop = cv2.bitwise_not(cv2.multiply(inverse, a, scale=1.0 / 255.0))
    h, w = crop.shape[:2]
    side = max(int(round(max(h, w) * SQUARE_MARGIN)), max(h, w))
    top, left = (side - h) // 2, (side - w) // 2
    return cv2.copyMakeBorder(crop, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT,
                              value=(255, 255, 255))


def _processor_stats(image_processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if image_processor is None:
        return CLIP_MEAN, CLIP_STD
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


def chw_uint8(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> contiguous uint8 (3, H, W). The training loader hands pixels over as these (4x
    less to pass between processes than float, and collation is a plain copy) and the trainer scales
    them on its device with `pixels_to_unit_range`."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> float in [-1, 1] (the VAE's input range); float input is returned as is.

    The one formula for VAE inputs made from uint8 pixels: the pipeline's source crop and RefineNet
    input, and the trainer's, so both see the same floats, bit for bit.
    """
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> contiguous float (3, H, W) in [0, 1], in one copy and one in-place pass."""
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw).mul_(1.0 / 255.0)


def prepare_subject(subject, clip_size: int, refine_size: int | None, image_processor=None,
                    refine_uint8: bool = False) -> SubjectInputs:
    """Preprocess a subject for the CLIP image encoder (Assign, Refine's detail encoder) and RefineNet.

    Args:
        subject: an RGBA PIL image (alpha = subject mask), an (image, mask) pair of PIL images,
            or a plain RGB image (the whole picture is the subject).
        clip_size: side of the CLIP input (the encoder's `image_size`, 224 for ViT-H).
        refine_size: side of RefineNet's pixel input (the model resolution; the VAE brings it to
            latent resolution). None: no RefineNet input is built (`refine_pixels` is None), which
            saves the largest resize when nothing uses it.
        image_processor: the encoder's `CLIPImageProcessor`, for its mean/std; CLIP defaults when None.
        refine_uint8: return `refine_pixels` as uint8 (3, R, R) instead, for a caller that scales it
            later with `pixels_to_unit_range` (the training loader: its workers pass 4x fewer bytes).

    Returns:
        SubjectInputs with `clip_pixels` (3, clip_size, clip_size) and `refine_pixels`
        (3, refine_size, refine_size) in [-1, 1] (None when `refine_size` is None).

    Raises:
        TypeError / ValueError: not an image, mask size differs from the image, or empty mask.
    """
    square_pixels = _square_array(subject)
    square = Image.fromarray(square_pixels)
    mean, std = _processor_stats(image_processor)
    clip = _to_tensor(square.resize((clip_size, clip_size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP))
    clip = (clip - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    refine = None
    if refine_size is not None:
        # The source crop's own resize (area when shrinking, bilinear when enlarging): RefineNet's VAE
        # input is our design, not CLIP's preprocessing, and OpenCV takes a fraction of PIL's time here.
        refine = chw_uint8(resize_square(square_pixels, refine_size))
        if not refine_uint8:
            refine = pixels_to_unit_range(refine)
    return SubjectInputs(clip_pixels=clip, refine_pixels=refine, square=square)
