"""RAM++ file names, where a checkpoint sits in a folder, and the tag list / per-tag thresholds.

Torch-free on purpose: `dataengine.config` asks `checkpoint_in` whether a configured folder holds a
RAM++ checkpoint while it validates pipelines.yaml, before any model library is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_REPO = "xinyu1205/recognize-anything-plus-model"
PUBLISHED_FILENAME = "ram_plus_swin_large_14m.pth"

# A converted folder (`python -m dataengine.ram convert`): weights, sizes, and the tag files.
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TAG_LIST_NAME = "tag_list.txt"
THRESHOLDS_NAME = "tag_thresholds.txt"

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_TAG_LIST = DATA_DIR / "ram_tag_list.txt"
BUILTIN_THRESHOLDS = DATA_DIR / "ram_tag_list_threshold.txt"


class TagListError(ValueError):
    """A tag list or threshold file does not match the checkpoint it is used with."""


def checkpoint_in(path: str | os.PathLike) -> Path | None:
    """The RAM++ checkpoint at `path`, or None when there is none.

    `path` is a `.pth` / `.pt` file (the published layout), or a folder holding a converted
    checkpoint (`model.safetensors` + `config.json`, preferred), the published file name, or exactly
    one `.pth` file.

    Returns:
        The file to load: a `.pth` file, or the converted folder's `model.safetensors`.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        return path / WEIGHTS_NAME
    if (path / PUBLISHED_FILENAME).is_file():
        return path / PUBLISHED_FILENAME
    pth = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    return pth[0] if len(pth) == 1 else None


def read_tag_list(path: str | os.PathLike, expected: int | None = None) -> list[str]:
    """Tag i of the model's output is line i of the file (kept verbatim but stripped; no comments).

    Raises:
        TagListError: a blank line, or not `expected` lines.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    tags = [line.strip() for line in lines]
    for number, tag in enumerate(tags, 1):
        if not tag:
            raise TagListError(f"tag list {os.fspath(path)!r}: line {number} is blank")
    if expected is not None and len(tags) != expected:
        raise TagListError(f"tag list {os.fspath(path)!r} holds {len(tags)} tags; the checkpoint has {expected}")
    return tags


def read_thresholds(path: str | os.PathLike, num_tags: int, default: float) -> list[float]:
    """Per-tag thresholds: line i is tag i's; tags past the file's end keep `default` (as upstream).

    Raises:
        TagListError: more lines than tags, or a line that is not a probability.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if len(lines) > num_tags:
        raise TagListError(f"thresholds {os.fspath(path)!r} hold {len(lines)} lines for {num_tags} tags")
    thresholds = [default] * num_tags
    for number, line in enumerate(lines, 1):
        try:
            value = float(line)
        except ValueError:
            raise TagListError(f"thresholds {os.fspath(path)!r}: line {number} ({line!r}) is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise TagListError(f"thresholds {os.fspath(path)!r}: line {number} ({value}) is not in [0, 1]")
        thresholds[number - 1] = value
    return thresholds
