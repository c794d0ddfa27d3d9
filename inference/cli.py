"""The `largen` command line: `largen inpaint --image PATH (--mask PATH | --box x0,y0,x1,y1) ... --out PATH`.

The model is `--model DIR|HUBID`, else `$LARGEN_MODEL` (a folder written by
`LARGenPipeline.save_pretrained`, e.g. the tiny zoo's `largen-pipeline`). Bad input (a missing or
unreadable file, a mask of the wrong size, no prompt and no subject, ...) prints one line,
`largen: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MODEL_ENV = "LARGEN_MODEL"
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: reported as one line, exit status 2."""


def _read_image(path: str, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} {path!r} does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CLIError(f"{what} {path!r} is not a readable image ({type(err).__name__})") from err


def _parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        box = tuple(float(v) for v in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise CLIError(f"--box must be x0,y0,x1,y1 (four numbers), got {text!r}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise CLIError(f"--box {text!r} is empty: need x1 > x0 and y1 > y0")
    return box


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largen", description="LAR-Gen promptable inpainting.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inpaint", help="inpaint a region of an image from a text prompt, a subject image, or both")
    p.add_argument("--image", required=True, help="source image")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="mask image, same size as --image (white = inpaint)")
    where.add_argument("--box", help="region to inpaint as x0,y0,x1,y1 pixels")
    p.add_argument("--prompt", default=None, help="text prompt")
    p.add_argument("--subject", default=None, help="subject image (RGBA, or RGB = the whole picture)")
    p.add_argument("--subject-mask", default=None, help="mask for an RGB --subject")
    p.add_argument("--beta", type=float, default=0.3, help="image prompt strength (default 0.3)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-zoom", action="store_true", help="inpaint the whole image instead of a crop around the mask")
    p.add_argument("--no-refine", action="store_true", help="do not use RefineNet")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--model", default=None, help=f"pipeline folder or hub id (default ${MODEL_ENV})")
    return parser


def _inpaint(args: argparse.Namespace) -> Path:
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise CLIError(f"no model: pass --model DIR|HUBID or set ${MODEL_ENV}")
    if not args.prompt and not args.subject:
        raise CLIError("nothing to inpaint with: give --prompt, --subject, or both")
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.beta < 0:
        raise CLIError(f"--beta must be >= 0, got {args.beta}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png path, got {args.out!r}")
    if not out.parent.is_dir():
        raise CLIError(f"output folder {str(out.parent)!r} does not exist")
    image = _read_image(args.image, "--image")
    if args.mask:
        mask = _read_image(args.mask, "--mask")
        if mask.size != image.size:
            raise CLIError(
                f"--mask is {mask.size[0]}x{mask.size[1]} but --image is {image.size[0]}x{image.size[1]}; they must match"
            )
    else:
        mask = _parse_box(args.box)
    subject = None
    if args.subject:
        subject = _read_image(args.subject, "--subject")
        if args.subject_mask:
            subject = (subject, _read_image(args.subject_mask, "--subject-mask"))

    # Heavy imports only once the arguments are known to be good.
    import torch

    from inference.loading import CheckpointNotFoundError
    from inference.pipeline import LARGenPipeline

    model_path = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or model.count("/") != 1) and not (model_path / "model_index.json").is_file():
        raise CLIError(f"--model {model!r} is not a LAR-Gen pipeline folder (no model_index.json)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = LARGenPipeline.from_pretrained(str(model_path) if model_path.exists() else model)
    except (OSError, CheckpointNotFoundError, ValueError) as err:
        raise CLIError(f"cannot load model {model!r}: {str(err).splitlines()[0]}") from err
    pipe = pipe.to(device)
    try:
        result = pipe(
            image,
            mask,
            prompt=args.prompt,
            subject_image=subject,
            beta=args.beta,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            generator=torch.Generator(device=device).manual_seed(args.seed),
            zoom_in=not args.no_zoom,
            use_refine=not args.no_refine,
        )
    except (ValueError, TypeError) as err:
        raise CLIError(str(err).splitlines()[0]) from err
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    result.images[0].save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `largen` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inpaint":
            out = _inpaint(args)
            print(f"wrote {out}")
    except CLIError as err:
        print(f"largen: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
