"""Safe image decoding for the data engine: size guards, first frame, EXIF transpose, mode normalisation.

`decode_image(data, max_pixels, max_side, min_side)` turns the raw bytes of any input image into an
upright 8-bit RGB array or raises `ImageDecodeError` with a reason a user can read in the shard's
parquet row. The array it returns is exactly the `source.jpg` the engine stores, so every box and
mask computed on it matches the stored (upright, size-capped) source.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Every format PIL can sniff is accepted; the bomb guard below replaces PIL's own global limit.
WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why (recorded as the row's error)."""


def decode_image(
    data: bytes,
    max_pixels: int,
    max_side: int | None = None,
    min_side: int = 1,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Decode image bytes into an upright RGB uint8 array (H, W, 3).

    Steps: size guards on the header (before any pixel is decoded), first frame of animations,
    EXIF orientation applied, any mode (CMYK, 16-bit, palette, alpha, grayscale, bilevel, float)
    mapped to 8-bit RGB (alpha composited on white), then the longest side capped at `max_side`.

    Args:
        data: the file's bytes.
        max_pixels: decompression-bomb guard: width * height above this is refused.
        max_side: cap on the longest side (LANCZOS downscale); None keeps the size.
        min_side: images whose shorter side is below this are refused (nothing can be mined).
        max_bytes: refuse files larger than this many bytes; None: no limit.

    Returns:
        A C-contiguous uint8 array of shape (H, W, 3).

    Raises:
        ImageDecodeError: empty, too large, not an image, truncated, too small, or undecodable.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(f"file has {len(data)} bytes, over limits.max_bytes={max_bytes}")
    with warnings.catch_warnings():
        # Our own max_pixels check replaces PIL's global bomb limit (warning at 89 Mpx, error at 2x).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError("not an image (format not recognised)") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageDecodeError(f"unreadable image header: {exc}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image is {width}x{height} = {width * height} pixels, over limits.max_pixels={max_pixels} "
                "(decompression-bomb guard)"
            )
        if min(width, height) < min_side:
            raise ImageDecodeError(f"image is {width}x{height}, smaller than limits.min_side={min_side}")
        try:
            if getattr(img, "is_animated", False):
                img.seek(0)  # animated GIF/PNG/WebP: the first frame is the scene
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            # PIL reports truncated data as OSError("image file is truncated ...").
            raise ImageDecodeError(f"cannot decode {img.format or 'image'} data: {exc}") from None
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Map any PIL mode to 8-bit RGB without clipping or losing meaning.

    16/32-bit integer and float images are rescaled to 0..255 (a plain `convert("L")` clips them to
    white); alpha (RGBA, LA, palette with transparency) is composited on white so transparent pixels
    do not turn into black background; CMYK, YCbCr, LAB, L and 1 go through PIL's converters.

    Raises:
        ValueError: a mode PIL cannot convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
