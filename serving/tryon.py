"""Virtual try-on (paper 6.5): a person photo, the garment's region found from words, a garment image as the subject.

The recipe is LAR-Gen's subject-driven inpainting with a mask from words: Grounding DINO + SAM
(`serving.masks.Masker`, the data engine's own models and profiles) find the region the words
name on the person ("upper clothes", "dress", ...), the mask grows by a few pixels so that the
new garment may be a little larger than the old one, and the garment image is the subject
(beta 1 without a prompt, the paper's subject-only setting; a prompt adds text guidance).

`largen tryon` is parsed by `inference.cli` and dispatched here by name at run time: `serving` may
import `dataengine` (the mask models), `inference` must not (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter

from inference import cli
from inference.cli import CLIError
from serving.masks import Masker, NothingFound

DEFAULT_GARMENT_WORDS = "upper clothes"


@dataclass
class TryOnResult:
    """The dressed person (source size), the garment mask it inpainted, and the boxes that found it."""

    image: Image.Image
    mask: Image.Image
    boxes: list[list[float]]


def garment_mask(masker: Masker, person: Image.Image, words: str = DEFAULT_GARMENT_WORDS, dilate: int = 8,
                 box_threshold: float = 0.25, text_threshold: float = 0.2) -> tuple[Image.Image, list[list[float]]]:
    """The region `words` names on `person` (Grounding DINO boxes → SAM), grown by `dilate` pixels.

    Returns:
        (0/255 L mask at the person's size, the boxes that prompted SAM).

    Raises:
        serving.masks.NothingFound: no box for the words above the thresholds, or SAM's mask is empty.
    """
    found = masker.from_text(person, words, box_threshold, text_threshold)
    mask = found.mask
    if dilate > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * dilate + 1))
    if mask.getbbox() is None:
        raise NothingFound(f"the mask for {words!r} is empty: nothing of the person to replace")
    return mask, found.boxes


def tryon(pipe, masker: Masker, person: Image.Image, garment, words: str = DEFAULT_GARMENT_WORDS,
          prompt: str | None = None, dilate: int = 8, box_threshold: float = 0.25, text_threshold: float = 0.2,
          **kwargs) -> TryOnResult:
    """Dress `person` in `garment`: find the garment region from `words`, inpaint it with the garment as the subject.

    Args:
        pipe: a LAR-Gen pipeline (SD-1.5 or SDXL).
        masker: the grounding + segmentation models (`Masker.from_profile`).
        person: the photo of the person.
        garment: the garment as a subject (RGBA, an (image, mask) pair, or RGB).
        words: what to replace, e.g. "upper clothes", "dress", "trousers".
        prompt: optional text guidance beside the garment.
        kwargs: passed to the pipeline call (`num_inference_steps`, `generator`, `beta`, ...).

    Raises:
        serving.masks.NothingFound: the words find nothing on the person; ValueError: a bad pipeline argument.
    """
    person = person.convert("RGB")
    mask, boxes = garment_mask(masker, person, words, dilate, box_threshold, text_threshold)
    out = pipe(person, mask, prompt=prompt, subject_image=garment, **kwargs)
    return TryOnResult(out.images[0], mask, boxes)


def tryon_command(args: argparse.Namespace) -> Path:
    """`largen tryon`: check every option, load the mask models and the pipeline, write --out.

    Raises:
        CLIError: a bad option or input (one line, exit status 2, from `inference.cli.main`).
    """
    from dataengine.models import ModelLoadError
    from dataengine.typed_config import ConfigError
    from serving.masks import DEFAULT_CONFIG

    model, has_text, out, fmt = cli.check_generation(args, ("--garment", "--garment-mask"), has_subject=True)
    if not args.garment_words.strip():
        raise CLIError("--garment-words is empty: name what to replace, e.g. 'upper clothes' or 'dress'")
    person = cli._to_rgb(cli._read_image(args.image, "--image"))
    garment = cli._read_image(args.garment, "--garment")
    garment_mask_image = cli._read_image(args.garment_mask, "--garment-mask") if args.garment_mask else None
    garment = cli.check_subject(
        garment, garment_mask_image, f"--garment {args.garment!r}",
        f"--garment-mask {args.garment_mask!r}" if garment_mask_image else None, "--garment", "--garment-mask",
    )
    config = args.config or DEFAULT_CONFIG
    if not os.path.isfile(config):
        raise CLIError(f"--config {str(config)!r} is not a file" if args.config else
                       f"--profile needs pipelines.yaml, which is not at {str(config)!r}: pass --config PATH")
    device = cli.check_device(args.device)
    try:
        masker = Masker.from_profile(args.profile, config, device=device)
    except (ConfigError, ModelLoadError) as err:
        raise CLIError(f"--profile {args.profile!r}: {str(err).splitlines()[0]}") from err
    pipe, device = cli.load_generation_pipeline(args, model)
    kwargs = cli.generation_kwargs(args, has_text, garment, device)
    prompt, garment = kwargs.pop("prompt"), kwargs.pop("subject_image")
    try:
        result = tryon(pipe, masker, person, garment, args.garment_words, prompt, args.dilate,
                       args.box_threshold, args.text_threshold, **kwargs)
    except NothingFound as err:
        raise CLIError(f"--garment-words {args.garment_words!r}: {err}; lower --box-threshold / "
                       f"--text-threshold or name the garment differently") from err
    except ValueError as err:
        raise CLIError(f"cannot try on: {str(err).splitlines()[0]}") from err
    cli._write_atomic(result.image, out, fmt)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.tryon ...`: the same as `largen tryon ...`."""
    return cli.main(["tryon", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
