"""Zoom-out (outpainting): extend the canvas of an image and fill the new border with the same LAR-Gen model.

The official LAR-Gen release offers zoom-out beside inpainting; here it is an inpainting call on a
larger canvas, so it works for every backbone (`LARGenPipeline`, `LARGenXLPipeline`) and every
mode (text, subject, both):

1. the canvas grows by a factor, uniform (`zoom_out=1.5`: 1.5 x the width and the height, the
   image centred) or per side (`extend=(left, top, right, bottom)`, fractions of the image's
   width or height added on that side);
2. the new border is the mask, the image keeps its pixels; the border starts as the image's
   edge pixels replicated (what the VAE sees of it never reaches the model, which gets the hole
   at zero, but it keeps the encoded canvas free of a hard black frame);
3. the whole canvas is inpainted (no zoom-in crop: the hole surrounds the image) at the model's
   resolution, and pasted back with no dilation and no feathering by default, so every pixel of
   the original image comes back unchanged (`blend` > 0 lets the new border fade over the
   image's outer `blend` pixels instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# The largest canvas growth per axis: beyond it the original is a few latent pixels at the model's
# resolution, and the "zoom out" is a new picture with a thumbnail in it.
MAX_ZOOM_OUT = 4.0


@dataclass(frozen=True)
class Canvas:
    """The extended canvas: the source image placed at (left, top) in a (width, height) canvas, and its mask."""

    image: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]  # where the original image lies in the canvas (x0, y0, x1, y1)


@dataclass
class OutpaintOutput:
    """What `outpaint` returns: the images (canvas size) and where the original lies in them."""

    images: list[Image.Image]
    box: tuple[int, int, int, int]
    mode: str


def margins(size: tuple[int, int], zoom_out: float | None = None,
            extend: Sequence[float] | None = None) -> tuple[int, int, int, int]:
    """Pixels added on each side (left, top, right, bottom) for a uniform `zoom_out` or per-side `extend`.

    Args:
        size: the image's (width, height).
        zoom_out: the canvas is `zoom_out` times the image on both axes (> 1), the image centred.
        extend: fractions of the width (left, right) or height (top, bottom) added on each side
            (>= 0, at least one > 0).

    Raises:
        ValueError: neither or both given, a value out of range, or a border that rounds to no pixel.
    """
    if (zoom_out is None) == (extend is None):
        raise ValueError("give exactly one of zoom_out (a factor) and extend (left, top, right, bottom)")
    w, h = size
    if zoom_out is not None:
        if not (math.isfinite(zoom_out) and 1.0 < zoom_out <= MAX_ZOOM_OUT):
            raise ValueError(f"zoom_out must be a number in (1, {MAX_ZOOM_OUT:g}], got {zoom_out}")
        fracs = [(zoom_out - 1.0) / 2.0] * 4
    else:
        fracs = [float(v) for v in extend]
        if len(fracs) != 4:
            raise ValueError(f"extend must be 4 numbers (left, top, right, bottom), got {len(fracs)}")
        if not all(math.isfinite(v) and v >= 0 for v in fracs):
            raise ValueError(f"extend values must be finite numbers >= 0, got {tuple(fracs)}")
        for axis, (a, b) in (("width", (fracs[0], fracs[2])), ("height", (fracs[1], fracs[3]))):
            if 1.0 + a + b > MAX_ZOOM_OUT:
                raise ValueError(f"extend grows the {axis} {1 + a + b:g} times; at most {MAX_ZOOM_OUT:g}")
    left, top, right, bottom = (round(f * d) for f, d in zip(fracs, (w, h, w, h)))
    if left + top + right + bottom == 0:
        raise ValueError(f"the border rounds to no pixel on a {w}x{h} image; extend it more")
    return left, top, right, bottom


def extend_canvas(image: Image.Image, border: Sequence[int]) -> Canvas:
    """The image on a canvas grown by `border` (left, top, right, bottom) pixels, with the border as the mask."""
    left, top, right, bottom = (int(v) for v in border)
    rgb = np.asarray(image.convert("RGB"))
    canvas = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_REPLICATE)
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    h, w = rgb.shape[:2]
    mask[top:top + h, left:left + w] = 0
    return Canvas(Image.fromarray(canvas), Image.fromarray(mask, mode="L"), (left, top, left + w, top + h))


def outpaint(
    pipe,
    image: Image.Image,
    zoom_out: float | None = None,
    extend: Sequence[float] | None = None,
    prompt: str | None = None,
    subject_image=None,
    blend: int = 0,
    **kwargs,
) -> OutpaintOutput:
    """Zoom out: extend `image`'s canvas and fill the new border with `pipe` (any LAR-Gen pipeline).

    Args:
        pipe: a `LARGenPipeline` or `LARGenXLPipeline`.
        image: the picture to zoom out of.
        zoom_out / extend: the canvas growth (`margins`): one of them.
        prompt, subject_image: what the border shows (text, subject, or both, as for inpainting;
            e.g. a prompt describing the whole scene).
        blend: pixels of the original's outer rim the new border may fade over (0: the original
            comes back pixel for pixel).
        kwargs: passed to the pipeline call (`num_inference_steps`, `guidance_scale`, `generator`,
            `beta`, `use_refine`, `resolution`, ...); `zoom_in` is always False.

    Returns:
        `OutpaintOutput` with the canvas-sized images and the original's box in them.

    Raises:
        ValueError: a bad factor, border or pipeline argument.
    """
    if not isinstance(blend, int) or blend < 0:
        raise ValueError(f"blend must be a whole number of pixels >= 0, got {blend!r}")
    if "zoom_in" in kwargs or "mask_image" in kwargs:
        raise ValueError("outpaint makes its own mask and always inpaints the whole canvas (no zoom_in, mask_image)")
    source = image.convert("RGB")
    canvas = extend_canvas(source, margins(source.size, zoom_out, extend))
    result = pipe(
        canvas.image, canvas.mask, prompt=prompt, subject_image=subject_image, zoom_in=False, paste_dilation=blend, paste_feather=blend, **kwargs,
    )
    return OutpaintOutput(images=list(result.images), box=canvas.box, mode=result.mode)
