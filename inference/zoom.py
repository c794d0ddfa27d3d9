"""Zoom-in (paper 6.2): a square crop around the mask's box, and the paste-back that keeps the rest exact.

`zoom_box` + `crop_with_padding` are shared with the trainer's zoom-in augmentation. The
pipeline crops, resizes to the model resolution, inpaints, and `paste_back` blends the result into
the original through a feathered edge that lies inside a dilated mask: every pixel outside the
dilated mask comes back bit-identical to the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

DEFAULT_EXPANSION = 1.3
Box = tuple[int, int, int, int]


def mask_box(mask: np.ndarray | Image.Image, threshold: int = 128) -> Box:
    """(x0, y0, x1, y1) of the pixels >= threshold (x1, y1 exclusive).

    Raises:
        ValueError: the mask is empty.
    """
    arr = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    ys, xs = np.nonzero(arr >= threshold)
    if len(xs) == 0:
        raise ValueError("mask is empty: nothing to inpaint")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def zoom_box(mask_box_xyxy: Sequence[float], image_size: tuple[int, int], expansion: float = DEFAULT_EXPANSION) -> Box:
    """The square crop box around a mask box, `expansion` times its longer side, centred on it.

    Args:
        mask_box_xyxy: (x0, y0, x1, y1) of the region to inpaint (x1, y1 exclusive).
        image_size: (width, height) of the image.
        expansion: side of the square / longer side of the box (>= 1).

    Returns:
        (x0, y0, x1, y1) integer square box; it may extend past the image (see `crop_with_padding`).
        It is shifted inside the image where the image is large enough, so padding is only
        needed when the square is bigger than the image.

    Raises:
        ValueError: expansion < 1 or an empty box.
    """
    if expansion < 1:
        raise ValueError(f"zoom-in expansion must be >= 1, got {expansion}")
    x0, y0, x1, y1 = (float(v) for v in mask_box_xyxy)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty mask box {tuple(mask_box_xyxy)}")
    side = max(1, math.ceil(max(x1 - x0, y1 - y0) * expansion))
    width, height = image_size
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    # Prefer real context to padding: slide the square inside the image along each axis that fits.
    if side <= width:
        left = min(max(left, 0), width - side)
    if side <= height:
        top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def crop_with_padding(image: Image.Image, box: Sequence[int], fill=0) -> Image.Image:
    """Crop `box` out of `image`; the parts outside the image are `fill` (a colour for the image's mode)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    canvas = Image.new(image.mode, (x1 - x0, y1 - y0), fill)
    canvas.paste(image.crop((max(x0, 0), max(y0, 0), min(x1, image.width), min(y1, image.height))), (max(-x0, 0), max(-y0, 0)))
    return canvas


def blend_alpha(mask: Image.Image, dilation: int, feather: int) -> np.ndarray:
    """Paste-back weight in [0, 1]: 1 on the mask, a feathered ramp, exactly 0 outside `dilate(mask, dilation)`."""
    binary = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    dilated = binary.filter(ImageFilter.MaxFilter(2 * dilation + 1)) if dilation > 0 else binary
    outside = np.asarray(dilated) == 0
    alpha = np.asarray(dilated, dtype=np.float32) / 255.0
    if feather > 0:
        # A box blur of radius <= dilation keeps alpha == 1 on the mask itself; zeroing outside the
        # dilated mask afterwards keeps the edge inside it.
        alpha = np.asarray(dilated.filter(ImageFilter.BoxBlur(feather)), dtype=np.float32) / 255.0
        alpha = np.maximum(alpha, np.asarray(binary, dtype=np.float32) / 255.0)
    alpha[outside] = 0.0
    return alpha


def paste_back(
    original: Image.Image,
    generated: Image.Image,
    box: Sequence[int],
    mask: Image.Image,
    dilation: int | None = None,
    feather: int | None = None,
) -> Image.Image:
    """Blend an inpainted crop back into the full image.

    Args:
        original: the full source image (RGB).
        generated: the inpainted crop, any size (resized to the box).
        box: the crop box it came from (`zoom_box`), possibly past the image edges.
        mask: full-size mask of the inpainted region (L, >= 128 = inpainted).
        dilation: pixels the mask grows by before blending; default 2% of the box side (>= 2).
        feather: radius of the soft edge, <= dilation; default half the dilation.

    Returns:
        A new RGB image; every pixel outside the dilated mask (or outside the box) equals `original`.

    Raises:
        ValueError: the mask size differs from the image.
    """
    if mask.size != original.size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, image {original.size[0]}x{original.size[1]}")
    x0, y0, x1, y1 = (int(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    dilation = max(2, round(0.02 * side)) if dilation is None else dilation
    feather = max(1, dilation // 2) if feather is None else min(feather, dilation)
    base = np.asarray(original.convert("RGB"))
    canvas = base.copy()
    gen = generated.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    # Place the crop on a full-size canvas (only its part inside the image).
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, original.width), min(y1, original.height)
    canvas[iy0:iy1, ix0:ix1] = np.asarray(gen)[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    alpha = blend_alpha(mask, dilation, feather)
    inside_box = np.zeros_like(alpha, dtype=bool)
    inside_box[iy0:iy1, ix0:ix1] = True
    alpha[~inside_box] = 0.0
    a = alpha[..., None]
    blended = np.clip(np.rint(canvas.astype(np.float32) * a + base.astype(np.float32) * (1.0 - a)), 0, 255).astype(np.uint8)
    # Bit-exact outside the blend region, whatever float rounding does.
    out = np.where(a > 0, blended, base)
    return Image.fromarray(out)
