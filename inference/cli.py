"""The `largen` command line: `largen inpaint --image PATH (--mask PATH | --box x0,y0,x1,y1) ... --out PATH`,
`largen outpaint` (zoom-out), `largen tryon` (virtual try-on, run by `serving.tryon`), `largen serve` and `largen eval`.

The model is `--model DIR|HUBID`, else `$LARGEN_MODEL` (a folder written by
`LARGenPipeline.save_pretrained`, e.g. the tiny zoo's `largen-pipeline`). Every argument is checked
before any model work: bad input (a missing, unreadable or oversized image, a folder where a file
belongs, a mask of the wrong size or with nothing in it, a box outside the image, an unusable
device, an output that cannot be written, a folder that is not a LAR-Gen pipeline, ...) prints one
line, `largen: error: ...` (argparse's own errors: `largen inpaint: error: ...`), naming the
argument or file, and exits with status 2. The output is written only when the run succeeds, to a
temporary file in the same folder that is then renamed over `--out`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import stat
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from io import BytesIO
from pathlib import Path

from PIL import Image

MODEL_ENV = "LARGEN_MODEL"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PIPELINE_CLASS = "LARGenPipeline"
# The classes `largen inpaint` loads (mirrors inference.sdxl.PIPELINE_CLASS_NAMES without importing torch).
PIPELINE_CLASSES = (PIPELINE_CLASS, "LARGenXLPipeline")
MASK_THRESHOLD = 128  # white, as inference.subject and inference.zoom read masks
# Mirrors inference.pipeline.DEFAULT_BETA / BETA_MAX; importing the pipeline here would load torch
# and diffusers for `largen --help`. tests/inference/test_cli.py keeps the two in step.
BETA_SUBJECT_ONLY = 1.0
BETA_WITH_TEXT = 0.3
BETA_MAX = 2.0
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a uint64
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}  # --dtype -> torch attribute
# Errors PIL raises for a damaged file (UnidentifiedImageError is an OSError); the rest are what
# older or third-party decoders have been seen to leak.
_IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error)


class CLIError(Exception):
    """A user error: reported as one line, exit status 2 (over HTTP: a 4xx with that line)."""


class ImageTooLarge(CLIError):
    """An image over the pixel limit (a decompression bomb, or the server's `max_pixels`)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: message`, no usage block (see `--help`)."""

    def error(self, message: str):
        if message.endswith("expected one argument"):
            # `--box -1,2,3,4` reads -1,2,3,4 as an option: say how to pass such a value.
            message += " (a value that starts with '-' needs the --name=VALUE form)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _version() -> str:
    try:
        return metadata.version("lar-gen")
    except metadata.PackageNotFoundError:
        return "unknown (lar-gen is not installed; run `make install`)"


# ---------------------------------------------------------------------- argument types
def _int_type(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def _float_type(low: float, high: float, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # NaN fails both comparisons, so it lands here too.
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


# The numeric options of an inpainting request, by name: the CLI flags and the server's form fields
# parse with the same functions, so both accept and refuse the same values with the same words.
OPTION_TYPES = {
    "beta": _float_type(0.0, BETA_MAX, f"a number in [0, {BETA_MAX:g}]"),
    "steps": _int_type(1, 10**6, "a whole number >= 1"),
    "guidance": _float_type(0.0, math.inf, "a finite number >= 0"),
    "seed": _int_type(0, SEED_MAX, f"a whole number in [0, {SEED_MAX}]"),
}


def add_generation_arguments(p: argparse.ArgumentParser, subject: bool = True) -> None:
    """The options every generating command shares (inpaint, outpaint, tryon): guidance, sampling, device, output, model."""
    p.add_argument("--prompt", default=None, help="text prompt")
    if subject:
        p.add_argument("--subject", default=None, help="subject image (RGBA: alpha = subject; RGB: the whole picture)")
        p.add_argument("--subject-mask", default=None,
                       help="mask for --subject, same size (white = subject; overrides alpha)")
    p.add_argument(
        "--beta",
        type=OPTION_TYPES["beta"],
        default=None,
        help=f"image prompt strength beta in [0, {BETA_MAX:g}] (default: the mode's, as in the paper's "
        f"Table 1: {BETA_SUBJECT_ONLY:.1f} for --subject without --prompt, {BETA_WITH_TEXT:.1f} with a --prompt; "
        "an SDXL folder may save its own, e.g. the converted official weights: 1.0 with --subject, 0 without)",
    )
    p.add_argument(
        "--steps", type=OPTION_TYPES["steps"], default=50, help="denoising steps (default 50)"
    )
    p.add_argument(
        "--guidance",
        type=OPTION_TYPES["guidance"],
        default=7.5,
        help="classifier-free guidance scale (default 7.5; <= 1 turns guidance off)",
    )
    p.add_argument(
        "--seed", type=OPTION_TYPES["seed"], default=0,
        help="random seed (default 0)",
    )
    p.add_argument("--no-refine", action="store_true", help="do not use RefineNet")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N, mps (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="weights and activations: float32 (default), float16 (GPU only) or bfloat16")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last convolution weights (UNets, VAE): faster on tensor-core GPUs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and RefineNet (pays off over many images; the first call compiles)")
    p.add_argument(
        "--out", required=True,
        help="output image path; the format follows the suffix (.png, .jpg, .webp, ...); written only on success",
    )
    p.add_argument("--model", default=None, help=f"LAR-Gen pipeline folder or hub id (default ${MODEL_ENV})")


def build_parser() -> argparse.ArgumentParser:
    """The `largen` argument parser (inpaint, outpaint, tryon, convert-official, serve, eval); its errors are one line, exit status 2."""
    parser = _Parser(prog="largen", description="LAR-Gen promptable inpainting.")
    parser.add_argument("--version", action="version", version=f"largen {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inpaint",
        help="inpaint a region of an image from a text prompt, a subject image, or both",
        description="Inpaint the masked region of --image guided by --prompt, --subject, or both. "
        "Bad input prints one line 'largen: error: ...' and exits with status 2; --out is written "
        "only when the run succeeds.",
    )
    p.add_argument("--image", required=True, help="source image")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="mask image, same size as --image (white, >= 128, = inpaint)")
    where.add_argument("--box", help="region to inpaint as x0,y0,x1,y1 pixels inside the image (x1, y1 exclusive)")
    add_generation_arguments(p)
    p.add_argument("--no-zoom", action="store_true", help="inpaint the whole image instead of a crop around the mask")
    o = sub.add_parser(
        "outpaint",
        help="zoom out: extend the canvas and fill the new border (text, subject or both)",
        description="Zoom out of --image: the canvas grows by --zoom-out F (both axes, the image centred) or "
        "--extend L,T,R,B (fractions of the width / height added per side), and the new border is filled "
        "by the model, guided by --prompt, --subject, or both; the original pixels are kept. Bad input "
        "prints one line 'largen: error: ...' and exits with status 2; --out is written only on success.",
    )
    o.add_argument("--image", required=True, help="source image")
    grow = o.add_mutually_exclusive_group(required=True)
    grow.add_argument("--zoom-out", type=_float_type(1.0, 4.0, "a number in (1, 4]"), default=None, metavar="F",
                      help="canvas = F x the image on both axes, the image centred (1 < F <= 4)")
    grow.add_argument("--extend", default=None, metavar="L,T,R,B",
                      help="fractions of the image's width (L, R) or height (T, B) added on each side, e.g. 0.5,0,0.5,0")
    o.add_argument("--blend", type=_int_type(0, 512, "a whole number in [0, 512]"), default=0,
                   help="pixels of the original's rim the border may fade over (default 0: the original is kept exactly)")
    add_generation_arguments(o)
    t = sub.add_parser(
        "tryon",
        help="virtual try-on: dress a person in a garment image (the garment's region found from words)",
        description="Virtual try-on (paper 6.5): the region named by --garment-words (default 'upper clothes') "
        "is found in --image with the data engine's grounding + segmentation, and inpainted with --garment "
        "as the subject (and --prompt, if given). Needs the engine's models (--profile). Bad input prints "
        "one line 'largen: error: ...' and exits with status 2; --out is written only on success.",
    )
    t.add_argument("--image", required=True, help="photo of the person")
    t.add_argument("--garment", required=True, help="garment image (RGBA: alpha = garment; RGB: the whole picture)")
    t.add_argument("--garment-mask", default=None, help="mask for --garment, same size (white = garment)")
    t.add_argument("--garment-words", default="upper clothes",
                   help="what to replace on the person, in words (default 'upper clothes'; e.g. 'dress', 'trousers')")
    t.add_argument("--profile", default="full",
                   help="the pipelines.yaml profile of the grounding and segmentation models (default full; tiny: the offline zoo)")
    t.add_argument("--config", default=None, help="pipelines.yaml holding --profile (default: the repository's)")
    t.add_argument("--box-threshold", type=_float_type(0.0, 1.0, "a number in [0, 1]"), default=0.25,
                   help="Grounding DINO box score a garment box needs (default 0.25, as /v1/mask)")
    t.add_argument("--text-threshold", type=_float_type(0.0, 1.0, "a number in [0, 1]"), default=0.2,
                   help="Grounding DINO phrase score a garment box needs (default 0.2, as /v1/mask)")
    t.add_argument("--dilate", type=_int_type(0, 256, "a whole number in [0, 256]"), default=8,
                   help="pixels the garment mask grows by, so the new garment may be larger (default 8)")
    add_generation_arguments(t, subject=False)
    add_convert_arguments(sub.add_parser(
        "convert-official",
        help="convert the official LAR-Gen release (SDXL, scepter) into a LAR-Gen pipeline folder",
        description="Convert the official largen_ckpt_s22k.pth (+ IP-Adapter-Plus SDXL ViT-H) into an SDXL "
        "LAR-Gen pipeline folder for `largen inpaint --model OUT`. Bad input prints one line "
        "'largen: error: ...' and exits with status 2; OUT is written only when the conversion succeeds.",
    ))
    add_serve_arguments(sub.add_parser(
        "serve",
        help="serve the HTTP API and the web editor (docs/serving.md)",
        description="Load the pipeline once and serve the HTTP API (/v1/..., OpenAPI docs at /docs) and the "
        "web editor (/). Bad input prints one line 'largen: error: ...' and exits with status 2.",
    ))
    add_eval_arguments(sub.add_parser(
        "eval",
        help="the paper's benchmark: build it, run models on it, report (docs/evaluation.md)",
        description="Build the paper's evaluation benchmark, run LAR-Gen and the baselines on it, and report "
        "Tables 1 and 2 and Fig. 13. Bad input prints one line 'largen: error: ...' and exits with status 2.",
    ))
    return parser


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `largen eval build|run|report`; the harness itself lives in `evaluation`."""
    positive = _int_type(1, 10**9, "a whole number >= 1")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="build a benchmark folder (cases.parquet + images)",
                       description="Build the benchmark from COCO val2017 + DreamBooth, or --synthetic offline.")
    b.add_argument("--out", required=True, help="benchmark folder to write")
    b.add_argument("--synthetic", action="store_true", help="a small offline benchmark from scikit-image photos and drawn subjects")
    b.add_argument("--coco", help="COCO folder: annotations/instances_val2017.json and val2017/")
    b.add_argument("--dreambooth", help="DreamBooth dataset folder (prompts_and_classes.txt, one folder per subject)")
    b.add_argument("--masks", help="folder of hand-made subject masks <subject>.png (white = subject); override the cuts")
    b.add_argument("--subjects", help="comma list of DreamBooth subjects instead of the seeded pick")
    b.add_argument("--seed", type=OPTION_TYPES["seed"], default=0, help="seed of the scene and subject picks and the case seeds (default 0)")
    b.add_argument("--scenes", type=positive, default=None, help="scene images (default 20; --synthetic 2)")
    b.add_argument("--subjects-per-kind", type=positive, default=None, help="live and non-live subjects each (default 5; --synthetic 1)")
    b.add_argument("--prompts", type=positive, default=None, help="prompts per subject, the first N of Fig. 9 (default 10; --synthetic 2)")
    b.add_argument("--config", default=None, help="pipelines.yaml for the cut-outs (default: the repository's)")
    b.add_argument("--pipeline", default="default", help="pipeline of --config whose ground/segment settings cut the subjects (default 'default')")
    b.add_argument("--profile", default=None, help="model profile for the cut-outs (default: the pipeline's)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --pipeline, e.g. ground.box_threshold=0.3")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out benchmark")
    r = sub.add_parser("run", help="run rows over a benchmark and score them (resumable)",
                       description="Run the requested rows over every case of --bench, score them, write OUT. "
                       "Rerunning the same command resumes: scored cases are skipped.")
    r.add_argument("--bench", required=True, help="benchmark folder (largen eval build)")
    r.add_argument("--out", required=True, help="results folder")
    r.add_argument("--model", default=None, help=f"LAR-Gen pipeline folder or hub id (default ${MODEL_ENV})")
    r.add_argument("--rows", default="table1", help="comma list of rows or groups: table1, table2, sweep, all (default table1)")
    r.add_argument("--profile", choices=("full", "tiny"), default="full",
                   help="model preset for the baselines and metrics: full (hub checkpoints) or tiny (the offline zoo)")
    for flag, what in (("--clip", "CLIP for CLIP-I/CLIP-T"), ("--dino", "DINO ViT-S/16 for DINO-I"),
                       ("--sd-inpainting", "SD-inpainting baseline"), ("--ip-adapter", "IP-Adapter-Plus of the SDIIPA row"),
                       ("--paint-by-example", "Paint-by-Example baseline"),
                       ("--locate-model", "Table 2 '+ Locate': SD-inpainting fine-tuned on regional captions"),
                       ("--assign-model", "Table 2 '++ Assign': the stage-1 LAR-Gen export")):
        r.add_argument(flag, default=None, help=f"{what} (hub id or folder; default: --profile's)")
    r.add_argument("--steps", type=OPTION_TYPES["steps"], default=50, help="denoising steps of every row (default 50)")
    r.add_argument("--guidance", type=OPTION_TYPES["guidance"], default=7.5, help="guidance scale w of every row (default 7.5)")
    r.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when there is a GPU, else cpu)")
    r.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="precision of the pipelines on a GPU (default float32; the metrics always run in float32)")
    r.add_argument("--shard", default=None, metavar="I/N", help="run only cases i with i mod N == I (default: RANK/WORLD_SIZE of accelerate launch or torchrun)")
    r.add_argument("--limit", type=positive, default=None, help="only the first N cases (a smoke test)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("report", help="merge the results of OUT into results.parquet, summary.json, table.md and figures",
                   description="Merge every part of a run (all shards) into the report files.").add_argument(
        "--out", required=True, help="results folder of `largen eval run`")
    return p


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `largen convert-official` (`inference.official.convert_official`)."""
    p.add_argument("ckpt", metavar="CKPT", help="the official checkpoint (largen_ckpt_s22k.pth, or a .safetensors of it)")
    p.add_argument("out", metavar="OUT", help="pipeline folder to write (must not exist unless --overwrite)")
    p.add_argument("--base", default="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
                   help="SDXL-inpainting hub id or folder: text encoders, tokenizers, scheduler, VAE "
                   "(default diffusers/stable-diffusion-xl-1.0-inpainting-0.1)")
    p.add_argument("--image-prompt", default="h94/IP-Adapter",
                   help="hub id or folder holding the CLIP ViT-H image encoder (default h94/IP-Adapter)")
    p.add_argument("--image-encoder-folder", default="models/image_encoder",
                   help="the encoder's folder inside --image-prompt (default models/image_encoder)")
    p.add_argument("--ip-adapter", default=None,
                   help="IP-Adapter-Plus SDXL ViT-H file (ip-adapter-plus_sdxl_vit-h.bin/.safetensors) for the "
                   "resampler, when CKPT does not carry it")
    p.add_argument("--vae", default=None, help="VAE hub id or folder instead of --base's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                   help="dtype of the saved weights (default float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return p


def _convert(args: argparse.Namespace) -> Path:
    ckpt = Path(args.ckpt).expanduser()
    kind = _path_kind(ckpt, f"CKPT {args.ckpt!r}")
    if kind == "missing":
        raise CLIError(f"CKPT {args.ckpt!r} does not exist")
    if kind != "file":
        raise CLIError(f"CKPT {args.ckpt!r} is not a file")
    if args.ip_adapter is not None and _path_kind(Path(args.ip_adapter).expanduser(), f"--ip-adapter {args.ip_adapter!r}") != "file":
        raise CLIError(f"--ip-adapter {args.ip_adapter!r} is not a file")
    out = Path(args.out).expanduser()
    out_kind = _path_kind(out, f"OUT {args.out!r}")
    if out_kind not in ("missing", "dir"):
        raise CLIError(f"OUT {args.out!r} exists and is not a folder")
    if out_kind == "dir" and not args.overwrite:
        raise CLIError(f"OUT {args.out!r} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise CLIError(f"OUT {args.out!r}: the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise CLIError(f"OUT {args.out!r}: the folder {str(out.parent)!r} is not writable")

    import torch

    from inference.loading import CheckpointNotFoundError
    from inference.official import convert_official

    try:
        with _model_loading(show_bars=sys.stderr.isatty()):
            convert_official(
                ckpt, out, base=args.base, image_prompt=args.image_prompt,
                image_encoder_folder=args.image_encoder_folder, ip_adapter=args.ip_adapter, vae=args.vae,
                torch_dtype=getattr(torch, DTYPES[args.dtype]),
            )
    except CheckpointNotFoundError as err:
        raise CLIError(str(err).splitlines()[0]) from err
    except ValueError as err:  # OfficialCheckpointError, or weights that do not fit one another
        raise CLIError(f"CKPT {args.ckpt!r}: {str(err).splitlines()[0]}") from err
    except OSError as err:
        raise CLIError(f"OUT {args.out!r} could not be written ({err.strerror or err})") from err
    return out


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `largen serve` (also `largen-serve`); the server itself lives in `serving`."""
    positive = _int_type(1, 10**9, "a whole number >= 1")
    p.add_argument("--model", default=None, help=f"LAR-Gen pipeline folder or hub id (default ${MODEL_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_type(0, 65535, "a port number in [0, 65535]"), default=7860,
                   help="port (default 7860)")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /v1 requests (default: read $LARGEN_TOKEN; none if unset)")
    p.add_argument("--profile", default=None,
                   help="model profile of --config for click and word masks (Grounding DINO + SAM): tiny or full "
                   "(default: no mask models)")
    p.add_argument("--config", default=None, help="pipelines.yaml holding the profiles (default: the repository's)")
    p.add_argument("--max-queue", type=positive, default=8, help="requests queued or running before 503 (default 8)")
    p.add_argument("--timeout", type=_float_type(0.001, math.inf, "a number of seconds > 0"), default=300.0,
                   help="seconds a request may take, queue included (default 300)")
    p.add_argument("--max-upload-mb", type=_float_type(0.001, 10**6, "a number of megabytes > 0"), default=20.0,
                   help="largest upload in MiB (default 20)")
    p.add_argument("--max-pixels", type=positive, default=4096 * 4096,
                   help="largest image in pixels, width x height (default 16777216)")
    p.add_argument("--steps", type=OPTION_TYPES["steps"], default=50,
                   help="denoising steps when a request gives none (default 50)")
    return p


# ---------------------------------------------------------------------- checks (no model work)
def _path_kind(path: Path, what: str) -> str:
    """"missing", "dir", "file" or "other" (symlinks followed).

    Raises:
        CLIError: naming `what`, when the lookup itself fails (a name too long, a symlink loop,
            a folder on the way that may not be searched); pathlib's is_dir/exists raise then.
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a file where a folder should be on the way
        return "missing"
    except OSError as err:
        raise CLIError(f"{what} cannot be accessed ({err.strerror or err})") from err
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def _check_out(text: str) -> tuple[Path, str]:
    """The path to write and its PIL format, once the output is known to be writable."""
    out = Path(text).expanduser()
    kind = _path_kind(out, f"--out {text!r}")
    if kind == "dir":
        raise CLIError(f"--out {text!r} is a folder; give an image file path such as {str(Path(text, 'out.png'))!r}")
    if kind == "other":
        raise CLIError(f"--out {text!r} exists and is not a regular file")
    if out.is_symlink():
        # Write the file the link names: renaming over the link would replace the link, not its target.
        out = Path(os.path.realpath(out))
    if not out.suffix:
        raise CLIError(f"--out {text!r} has no suffix; end it in an image format such as .png or .jpg")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    try:
        if fmt is None:
            raise KeyError(out.suffix)
        # Some registered formats cannot hold RGB or have no writer installed: try a 1-pixel one.
        Image.new("RGB", (1, 1)).save(BytesIO(), format=fmt)
    except (KeyError, *_IMAGE_ERRORS) as err:
        raise CLIError(f"--out {text!r}: PIL cannot write an RGB image as {out.suffix!r}; use .png, .jpg or .webp") from err
    parent = out.parent
    kind = _path_kind(parent, f"--out {text!r}: folder {str(parent)!r}")
    if kind == "missing":
        raise CLIError(f"--out {text!r}: folder {str(parent)!r} does not exist")
    if kind != "dir":
        raise CLIError(f"--out {text!r}: {str(parent)!r} is not a folder")
    # Probe with a real file: os.access says yes to root on read-only mounts and no to ACL grants.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CLIError(f"--out {text!r}: cannot write in folder {str(parent)!r} ({err.strerror or err})") from err
    return out, fmt


def _read_image(path: str, flag: str) -> Image.Image:
    """Open and decode `path` fully (so a truncated file fails here, not mid-run)."""
    p = Path(path).expanduser()
    kind = _path_kind(p, f"{flag} {path!r}")
    if kind == "dir":
        raise CLIError(f"{flag} {path!r} is a folder, not an image file")
    if kind == "missing":
        raise CLIError(f"{flag} {path!r} does not exist")
    if kind != "file":
        raise CLIError(f"{flag} {path!r} is not a regular file")
    try:
        return decode_image(p, f"{flag} {path!r}")
    except PermissionError as err:
        raise CLIError(f"{flag} {path!r} cannot be read (permission denied)") from err


def decode_image(source, label: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path or a binary file object (the CLI and the server share it).

    Args:
        source: a path or a readable binary file object.
        label: how messages name the input (`--image 'a.png'` on the command line, `image` over HTTP).
        max_pixels: refuse images with more pixels than this before decoding them (None: PIL's
            decompression-bomb limit only).

    Returns:
        The decoded image (a copy, detached from the file).

    Raises:
        ImageTooLarge: over `max_pixels` or PIL's decompression-bomb limit.
        CLIError: not a readable image.
        PermissionError: the file cannot be read.
    """
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that PIL only warns, then decodes the whole thing.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            with img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    # The header gives the size: refuse before a single pixel is decoded.
                    raise ImageTooLarge(
                        f"{label} is {_size(img)} = {img.width * img.height:,} pixels; the limit is {max_pixels:,}"
                    )
                img.load()
                return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(
            f"{label} is too large: over {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's decompression-bomb limit)"
        ) from err
    except PermissionError:
        raise
    except _IMAGE_ERRORS as err:
        raise CLIError(f"{label} is not a readable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits; PIL's own convert clips it, turning anything above 255 white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        import numpy as np

        arr = np.asarray(image.convert("I"), dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    return _to_8bit(image).convert("RGB")


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


def check_mask(mask: Image.Image, image: Image.Image, label: str, name: str = "--mask", image_name: str = "--image") -> Image.Image:
    """The mask as 8-bit L, once it is known to match `image` and to have a white pixel.

    `label` names the mask's source in the empty-mask message; `name` / `image_name` name the two
    inputs (command-line flags or form fields).

    Raises:
        CLIError: a size mismatch or an empty mask.
    """
    if mask.size != image.size:
        raise CLIError(f"{name} is {_size(mask)} but {image_name} is {_size(image)}; they must match")
    gray = _to_8bit(mask).convert("L")
    if gray.getextrema()[1] < MASK_THRESHOLD:
        raise CLIError(f"{label} is empty: no pixel is white (>= {MASK_THRESHOLD}), so there is nothing to inpaint")
    return gray


def parse_box(text: str, size: tuple[int, int], name: str = "--box") -> tuple[float, float, float, float]:
    """x0,y0,x1,y1 inside an image of `size` (w, h), at least one whole pixel after rounding.

    Raises:
        CLIError: naming `name` (the flag or form field), when the box is malformed or unusable.
    """
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise CLIError(f"{name} must be x0,y0,x1,y1 (four numbers), got {text!r}")
    if not all(math.isfinite(v) for v in box):
        raise CLIError(f"{name} {text!r} has a non-finite number; give four pixel coordinates")
    x0, y0, x1, y1 = box
    if min(box) < 0:
        raise CLIError(f"{name} {text!r} has a negative coordinate; pixels start at 0")
    if x1 <= x0 or y1 <= y0:
        raise CLIError(f"{name} {text!r} is empty or inverted: need x1 > x0 and y1 > y0")
    w, h = size
    if x1 > w or y1 > h:
        raise CLIError(f"{name} {text!r} goes outside the {w}x{h} image: need x1 <= {w} and y1 <= {h}")
    # The pipeline rounds a box to whole pixels (box_to_mask); a sliver can round to nothing.
    if round(x1) <= round(x0) or round(y1) <= round(y0):
        raise CLIError(f"{name} {text!r} covers no whole pixel once rounded to pixel coordinates")
    return box


def _read_subject(args: argparse.Namespace):
    """The subject as the pipeline takes it (an image, or an (image, mask) pair), known to be non-empty."""
    subject = _read_image(args.subject, "--subject")
    mask = _read_image(args.subject_mask, "--subject-mask") if args.subject_mask else None
    return check_subject(
        subject, mask, f"--subject {args.subject!r}", f"--subject-mask {args.subject_mask!r}" if mask else None
    )


def check_subject(
    subject: Image.Image,
    mask: Image.Image | None,
    label: str,
    mask_label: str | None = None,
    name: str = "--subject",
    mask_name: str = "--subject-mask",
):
    """The subject as the pipeline takes it (an image, or an (image, mask) pair), known to be non-empty.

    Raises:
        CLIError: the mask does not match the subject, or nothing of the subject is left.
    """
    from inference.subject import subject_square

    if mask is not None:
        if mask.size != subject.size:
            raise CLIError(f"{mask_name} is {_size(mask)} but {name} is {_size(subject)}; they must match")
        subject = (_to_rgb(subject), _to_8bit(mask).convert("L"))
        empty = f"{mask_label or mask_name} is empty: no pixel is white (>= {MASK_THRESHOLD})"
    else:
        subject = _to_8bit(subject)
        empty = f"{label} is fully transparent: no pixel has alpha >= {MASK_THRESHOLD}"
    try:
        subject_square(subject)  # the pipeline's own preprocessing: it refuses an empty subject
    except ValueError as err:
        raise CLIError(f"{empty}, so there is no subject") from err
    return subject


def check_device(text: str | None) -> str:
    """The torch device to run on: `text` checked against this machine, or cuda when available, else cpu.

    Raises:
        CLIError: not a device, or one this machine does not have.
    """
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {text!r} is not a device: use cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise CLIError(f"--device {text!r}: there is one CPU device; use cpu")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text!r}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {text!r}: MPS (Apple GPU) is not available on this machine (use --device cpu)")
    else:
        raise CLIError(f"--device {text!r}: the {device.type!r} device type is not supported; use cpu, cuda, cuda:N or mps")
    return str(device)


def check_model(model: str) -> str:
    """The model reference to load; a local folder must be a LAR-Gen pipeline (`model_index.json`).

    Raises:
        CLIError: a missing folder, or one that is not a complete LAR-Gen pipeline.
    """
    from inference.loading import _looks_like_local_path

    path = Path(model).expanduser()
    kind = _path_kind(path, f"--model {model!r}")
    if kind == "missing" and not _looks_like_local_path(model):
        return model  # a hub id: from_pretrained reports what it cannot find
    if kind == "missing":
        raise CLIError(f"--model {model!r} does not exist")
    if kind != "dir":
        raise CLIError(f"--model {model!r} is not a folder (a LAR-Gen pipeline is a folder with model_index.json)")
    index = path / "model_index.json"
    if _path_kind(index, f"--model {model!r}: model_index.json") != "file":
        raise CLIError(f"--model {model!r} is not a LAR-Gen pipeline folder (no model_index.json)")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"--model {model!r}: model_index.json is not valid JSON ({str(err).splitlines()[0]})") from err
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in PIPELINE_CLASSES:
        raise CLIError(f"--model {model!r} holds a {name or 'pipeline of unknown class'}, not a {PIPELINE_CLASS}")
    for component, spec in config.items():
        if not component.startswith("_") and isinstance(spec, list) and spec[0] is not None and not (path / component).is_dir():
            raise CLIError(f"--model {model!r} is incomplete: model_index.json lists {component!r} but the folder has no {component}/")
    return str(path)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _model_loading(show_bars: bool) -> Iterator[None]:
    """Load quietly: no loading progress bars unless `show_bars`; library log lines held back.

    diffusers and transformers log their own view of a failed load ("Couldn't connect to the Hub",
    "see the stacktrace above") before raising; when the load fails the one-line error says it
    all, so those lines are dropped. When it succeeds they are passed on as usual. Every setting
    is restored afterwards (tests call `main` in-process).
    """
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    bars = [(log, log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    if not show_bars:
        for log, _ in bars:
            log.disable_progress_bar()
    held = _Held()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    handlers = [list(logger.handlers) for logger in loggers]
    for logger in loggers:
        logger.handlers = [held]
    try:
        yield
    except BaseException:
        held.records.clear()
        raise
    finally:
        for logger, saved in zip(loggers, handlers, strict=True):
            logger.handlers = saved
        for log, was_enabled in bars:
            (log.enable_progress_bar if was_enabled else log.disable_progress_bar)()
        for record in held.records:
            for handler in handlers[0 if record.name.startswith("diffusers") else 1]:
                if record.levelno >= handler.level:
                    handler.handle(record)


def _write_atomic(image: Image.Image, out: Path, fmt: str) -> None:
    """Write `image` to a temporary file beside `out`, then rename it over `out` (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the replaced file's).
        if out.exists():
            mode = out.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CLIError(f"--out {str(out)!r} could not be written ({err.strerror or err})") from err
        raise


def check_guidance_inputs(
    prompt: str | None,
    has_subject: bool,
    has_subject_mask: bool,
    names: tuple[str, str, str] = ("--prompt", "--subject", "--subject-mask"),
) -> bool:
    """Check that a prompt, a subject or both are given; returns whether the prompt has text.

    Raises:
        CLIError: neither is given, or a subject mask comes without its subject.
    """
    prompt_name, subject_name, mask_name = names
    has_text = bool(prompt and prompt.strip())
    if not has_text and not has_subject:
        raise CLIError(f"nothing to inpaint with: give {prompt_name}, {subject_name}, or both")
    if has_subject_mask and not has_subject:
        raise CLIError(f"{mask_name} needs {subject_name} (it is the mask of that image)")
    return has_text


def load_pipeline(model_ref: str, model: str, show_bars: bool = False):
    """Load the `LARGenPipeline` at `model_ref` (checked by `check_model`); `model` is how the user wrote it.

    Raises:
        CLIError: one line naming `--model` when the load fails.
    """
    from inference.sdxl import load_largen_pipeline

    try:
        with _model_loading(show_bars=show_bars):
            # SD-1.5 or SDXL: the class follows the folder's model_index.json.
            return load_largen_pipeline(model_ref)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(" Please check out the root cause")[0]  # there is no stacktrace above
        raise CLIError(f"--model {model!r} cannot be loaded: {first}") from err


def check_steps(pipe, steps: int, name: str = "--steps") -> None:
    """Refuse more denoising steps than the model's scheduler was trained with.

    Raises:
        CLIError: `steps` is over the scheduler's `num_train_timesteps`.
    """
    train_steps = pipe.scheduler.config.get("num_train_timesteps")
    if train_steps is not None and steps > train_steps:
        raise CLIError(f"{name} must be <= {train_steps} (the model's training timesteps), got {steps}")


# ---------------------------------------------------------------------- the command
def check_generation(args: argparse.Namespace, subject_names: tuple[str, str] = ("--subject", "--subject-mask"),
                     has_subject: bool | None = None) -> tuple[str, bool, Path, str]:
    """The cheap checks of a generating command, before any image or model is read.

    Returns:
        (the model as written, whether the prompt has text, the output path, its image format).

    Raises:
        CLIError: no model, nothing to generate with, or a bad --out.
    """
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise CLIError(f"no model: pass --model DIR|HUBID or set ${MODEL_ENV}")
    subject = getattr(args, "subject", None) if has_subject is None else has_subject
    has_text = check_guidance_inputs(args.prompt, bool(subject), bool(getattr(args, "subject_mask", None)),
                                     ("--prompt", *subject_names))
    out, fmt = _check_out(args.out)
    return model, has_text, out, fmt


def load_generation_pipeline(args: argparse.Namespace, model: str):
    """The pipeline on the requested device and dtype, with the speed options; returns (pipe, device).

    Raises:
        CLIError: a bad --device, --dtype for that device, --model or --steps.
    """
    import torch

    device = check_device(args.device)
    if args.dtype == "float16" and not device.startswith("cuda"):
        raise CLIError(f"--dtype float16 needs a CUDA device (got --device {device}); use float32 or bfloat16")
    model_ref = check_model(model)
    interactive = sys.stderr.isatty()
    pipe = load_pipeline(model_ref, model, show_bars=interactive)
    check_steps(pipe, args.steps)
    pipe.set_progress_bar_config(disable=not interactive)
    pipe = pipe.to(device).optimize(dtype=getattr(torch, DTYPES[args.dtype]), channels_last=args.channels_last,
                                    compile=args.compile)
    return pipe, device


def generation_kwargs(args: argparse.Namespace, has_text: bool, subject, device: str) -> dict:
    """The pipeline-call arguments the shared options give (prompt, subject, beta, steps, guidance, seed, refine)."""
    import torch

    return {
        "prompt": args.prompt if has_text else None,
        "subject_image": subject,
        "beta": args.beta,
        "guidance_scale": args.guidance,
        "num_inference_steps": args.steps,
        "generator": torch.Generator(device=device).manual_seed(args.seed),
        "use_refine": not args.no_refine,
    }


def _inpaint(args: argparse.Namespace) -> Path:
    model, has_text, out, fmt = check_generation(args)
    image = _read_image(args.image, "--image")
    if args.mask:
        mask = check_mask(_read_image(args.mask, "--mask"), image, f"--mask {args.mask!r}")
    else:
        mask = parse_box(args.box, image.size)
    image = _to_rgb(image)
    subject = _read_subject(args) if args.subject else None
    pipe, device = load_generation_pipeline(args, model)
    try:
        result = pipe(image, mask, zoom_in=not args.no_zoom, **generation_kwargs(args, has_text, subject, device))
    except ValueError as err:
        raise CLIError(f"cannot inpaint: {str(err).splitlines()[0]}") from err
    _write_atomic(result.images[0], out, fmt)
    return out


def parse_extend(text: str) -> tuple[float, float, float, float]:
    """`--extend L,T,R,B`: four fractions >= 0.

    Raises:
        CLIError: not four finite numbers >= 0.
    """
    parts = text.split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise CLIError(f"--extend {text!r} must be four numbers >= 0: left,top,right,bottom (fractions of the image)")
    return values


def _outpaint(args: argparse.Namespace) -> Path:
    from inference.outpaint import margins, outpaint

    model, has_text, out, fmt = check_generation(args)
    extend = parse_extend(args.extend) if args.extend is not None else None
    image = _to_rgb(_read_image(args.image, "--image"))
    try:
        margins(image.size, args.zoom_out, extend)
    except ValueError as err:
        flag = "--zoom-out" if args.zoom_out is not None else "--extend"
        raise CLIError(f"{flag}: {err}") from err
    subject = _read_subject(args) if args.subject else None
    pipe, device = load_generation_pipeline(args, model)
    kwargs = generation_kwargs(args, has_text, subject, device)
    try:
        result = outpaint(pipe, image, zoom_out=args.zoom_out, extend=extend, blend=args.blend, **kwargs)
    except ValueError as err:
        raise CLIError(f"cannot outpaint: {str(err).splitlines()[0]}") from err
    _write_atomic(result.images[0], out, fmt)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `largen` console script; returns the exit status (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a one-line argparse error
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        if args.command == "inpaint":
            out = _inpaint(args)
            print(f"wrote {out}")
        elif args.command == "outpaint":
            out = _outpaint(args)
            print(f"wrote {out}")
        elif args.command == "tryon":
            # By name, at run time, as for serve: the garment mask comes from the engine's models.
            out = importlib.import_module("serving.tryon").tryon_command(args)
            print(f"wrote {out}")
        elif args.command == "convert-official":
            out = _convert(args)
            print(f"wrote {out}")
        elif args.command == "serve":
            # By name, at run time: `serving` imports `dataengine` (mask models), and `inference`
            # must not depend on `dataengine` (docs/architecture.md), so nothing here imports it.
            return importlib.import_module("serving.cli").serve(args)
        elif args.command == "eval":
            # By name, at run time, as for serve: `evaluation` imports `dataengine` (the cut-outs).
            return importlib.import_module("evaluation.cli").main(args)
    except CLIError as err:
        print(f"largen: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("largen: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
