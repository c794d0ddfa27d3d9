"""Zoom-in (paper 6.2): a square crop around the mask's box, and the paste-back that keeps the rest exact.

`zoom_box` and `crop_resize` (the square crop at the model resolution) are shared with the
trainer's zoom-in augmentation, so a crop is the same pixels at training and at inference. The
pipeline crops, resizes to the model resolution, inpaints, and `paste_back` blends the result into
the original through a feathered edge that lies inside a dilated mask: every pixel outside the
dilated mask comes back bit-identical to the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
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


def crop_array(arr: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """`crop_with_padding` on an HxW(xC) array: the parts of `box` outside it are 0 (a view when inside)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = arr.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return arr[y0:y1, x0:x1]  # a view: nothing is copied before the resize
    out = np.zeros((y1 - y0, x1 - x0, *arr.shape[2:]), dtype=arr.dtype)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = arr[iy0:iy1, ix0:ix1]
    return out


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 HxWx3 -> size x size: area averaging when shrinking (anti-aliased), bilinear when enlarging.

    OpenCV rather than PIL: several times faster, which the training loader needs on its CPUs.
    """
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    interpolation = cv2.INTER_AREA if arr.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=interpolation)


REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at (1/8, 1/4, 1/2 of each side)


def reduction(side: int, size: int) -> int:
    """The largest power-of-two reduction (8, 4, 2 or 1) of a `side`-px crop that leaves it at least `size` px."""
    return next((s for s in REDUCTIONS if side // s >= size), 1)


def snap_box(box: Sequence[int], scale: int) -> Box:
    """A square box moved and grown by less than `scale` px so that its corners fall on the `scale` grid.

    It still holds the whole of `box`; its pixels are whole pixels of the image reduced by `scale`.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if scale == 1:
        return x0, y0, x1, y1
    left, top = x0 // scale, y0 // scale
    side = -(-max(x1 - left * scale, y1 - top * scale) // scale)  # ceil
    return left * scale, top * scale, (left + side) * scale, (top + side) * scale


def _crop_rgb(image: Image.Image | np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The `box` of an RGB image as an array, black outside the image; a PIL image is cropped before
    it becomes an array (turning a whole multi-megapixel image into one costs more than the crop)."""
    if isinstance(image, np.ndarray):
        return crop_array(image, box)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(rgb.crop(tuple(int(v) for v in box)))  # PIL fills outside the image with 0


def crop_resize(image: Image.Image | np.ndarray, box: Sequence[int], size: int,
                decode_reduced: Callable[[int], Image.Image | np.ndarray] | None = None) -> tuple[np.ndarray, Box]:
    """The square crop `box` of an RGB image (black outside it) at `size`²: the one crop + resize of pipeline and trainer.

    In two steps: the crop is first reduced by `reduction(side, size)` (means of scale x scale
    blocks, on a box snapped to that grid), then area-averaged (or, below `size`, bilinearly
    enlarged) to `size`. The first step is what a JPEG decoder does when it decodes at a reduced
    scale, so the trainer decodes a multi-megapixel source at 1/2..1/8 and gets the pixels the
    pipeline gets from the full image (within a few grey levels: tests/training/test_data.py).

    Args:
        image: the image (PIL RGB, or HxWx3 uint8); not read when `decode_reduced` is given.
        box: square (x0, y0, x1, y1), possibly past the edges (`zoom_box`).
        size: output side.
        decode_reduced: `scale -> the image reduced by scale` (RGB, ceil of each side; PIL or
            HxWx3 uint8): a JPEG decoded at that scale, instead of block means of the full image.

    Returns:
        (size x size x 3 uint8 crop, the snapped box it covers, in full-size pixels).
    """
    scale = reduction(int(box[2]) - int(box[0]), size)
    box = snap_box(box, scale)
    if decode_reduced is not None:
        crop = _crop_rgb(decode_reduced(scale), [v // scale for v in box])
    else:
        crop = _crop_rgb(image, box)
        if scale > 1:  # an integer-factor INTER_AREA: exact block means
            side = (box[2] - box[0]) // scale
            crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
    return resize_square(crop, size), box


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
