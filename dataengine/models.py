"""The one place the data engine loads its models: tagger, grounding, segmenter, captioner, tag lists.

Each loader takes a Hugging Face hub id (the `full` profile's checkpoints, listed in
docs/data-engine.md "Models") or a local folder (the tiny offline zoo built by
`dataengine.tiny_models`) and goes through the library's own
`from_pretrained`, so the tiny tests exercise exactly the code that loads the real weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    AutoConfig,
    CLIPModel,
    CLIPProcessor,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    SamModel,
    SamProcessor,
)

from dataengine.config import is_local_ref

ROLE_TAGGER = "tagger"
ROLE_GROUNDING = "grounding"
ROLE_SEGMENTER = "segmenter"
ROLE_CAPTIONER = "captioner"

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_TAG_VOCABULARY = DATA_DIR / "tag_vocabulary.txt"
BUILTIN_NON_ENTITY_TAGS = DATA_DIR / "non_entity_tags.txt"
BUILTIN = "builtin"

ModelT = TypeVar("ModelT", bound=PreTrainedModel)


class ModelLoadError(OSError):
    """A model named in the config (hub id or local folder) cannot be found or loaded."""


def read_model_config(
    role: str, ref: str | os.PathLike, model_cls: type[PreTrainedModel]
) -> tuple[str, AutoConfig]:
    """Read the model config at `ref` (no weights) and check it is a `model_cls` checkpoint.

    Cheap enough to run in the driver before any Ray worker starts, so a missing or wrong model
    is one clear error rather than a failure inside every actor.

    Returns:
        (the ref as a string, local folders expanded; the config).

    Raises:
        ModelLoadError: a missing local folder, an unreadable config (e.g. a hub id that is neither
            cached nor downloadable), or a checkpoint of another kind of model.
    """
    ref_str = os.fspath(ref)
    if is_local_ref(ref_str):
        path = Path(ref_str).expanduser()
        if not path.is_dir():
            raise ModelLoadError(
                f"{role}: checkpoint folder {ref_str!r} does not exist. Build the tiny zoo with "
                "`make tiny-models`, or point the profile at a hub id or a downloaded checkpoint."
            )
        ref_str = str(path)
    try:
        config = AutoConfig.from_pretrained(ref_str)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{role}: cannot read the model config of {ref_str!r}: {exc}") from exc
    expected = model_cls.config_class.model_type
    # from_pretrained only warns on a mismatch and then builds a randomly initialised default-size model.
    if config.model_type != expected:
        raise ModelLoadError(
            f"{role}: {ref_str!r} holds a {config.model_type!r} checkpoint, expected {expected!r} "
            f"({model_cls.__name__}); is the profile pointing at the right model?"
        )
    return ref_str, config


def check_models(tagger: str | None, grounding: str, segmenter: str, captioner: str) -> None:
    """Check that each role's checkpoint is there and of the right kind (configs only, no weights).

    Args:
        tagger: the CLIP tagger's ref, or None when the pipeline tags with another backend.
        grounding, segmenter, captioner: the other roles' refs.

    Raises:
        ModelLoadError: naming the first role whose checkpoint is missing or of another kind.
    """
    roles = [
        (ROLE_GROUNDING, grounding, GroundingDinoForObjectDetection),
        (ROLE_SEGMENTER, segmenter, SamModel),
        (ROLE_CAPTIONER, captioner, LlavaForConditionalGeneration),
    ]
    if tagger is not None:
        roles.insert(0, (ROLE_TAGGER, tagger, CLIPModel))
    for role, ref, model_cls in roles:
        read_model_config(role, ref, model_cls)


def _load(
    role: str,
    ref: str | os.PathLike,
    model_cls: type[ModelT],
    processor_cls: type,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> tuple[ModelT, object]:
    """Load `model_cls` and `processor_cls` from `ref`, in eval mode on `device` / `dtype`.

    Raises:
        ModelLoadError: `ref` is a missing local folder, holds another kind of model, or either
            half fails to load.
    """
    ref_str, config = read_model_config(role, ref, model_cls)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = model_cls.from_pretrained(ref_str, config=config, **kwargs)
        processor = processor_cls.from_pretrained(ref_str)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{role}: cannot load {model_cls.__name__} / {processor_cls.__name__} from {ref_str!r}: {exc}"
        ) from exc
    model.to(device)
    model.eval()
    return model, processor


def load_tagger(
    ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[CLIPModel, CLIPProcessor]:
    """Load the CLIP model used for zero-shot tagging over a tag vocabulary.

    Args:
        ref: hub id (e.g. `openai/clip-vit-large-patch14`) or a local `save_pretrained` folder.
        device: where to put the model.
        dtype: weight dtype; None keeps the stored one.

    Returns:
        (model in eval mode, processor).

    Raises:
        ModelLoadError: the folder is missing or the checkpoint cannot be loaded.
    """
    return _load(ROLE_TAGGER, ref, CLIPModel, CLIPProcessor, device, dtype)


def load_clip(
    ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[CLIPModel, CLIPProcessor]:
    """Load the CLIP model that scores caption <-> crop agreement (the profile's `clip`); as `load_tagger`.

    Raises:
        ModelLoadError: the folder is missing or the checkpoint cannot be loaded (naming the role "clip").
    """
    return _load("clip", ref, CLIPModel, CLIPProcessor, device, dtype)


def load_grounding(
    ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Load Grounding DINO for open-vocabulary boxes from a text prompt ("cat . dog .").

    Args:
        ref: hub id (e.g. `IDEA-Research/grounding-dino-base`) or a local `save_pretrained` folder.
        device: where to put the model.
        dtype: weight dtype; None keeps the stored one.

    Returns:
        (model in eval mode, processor).

    Raises:
        ModelLoadError: the folder is missing or the checkpoint cannot be loaded.
    """
    return _load(ROLE_GROUNDING, ref, GroundingDinoForObjectDetection, GroundingDinoProcessor, device, dtype)


def load_segmenter(
    ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[SamModel, SamProcessor]:
    """Load SAM for box-prompted masks.

    Args:
        ref: hub id (e.g. `facebook/sam-vit-huge`) or a local `save_pretrained` folder.
        device: where to put the model.
        dtype: weight dtype; None keeps the stored one.

    Returns:
        (model in eval mode, processor).

    Raises:
        ModelLoadError: the folder is missing or the checkpoint cannot be loaded.
    """
    return _load(ROLE_SEGMENTER, ref, SamModel, SamProcessor, device, dtype)


def load_captioner(
    ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load LLaVA for region captions; the processor carries the chat template.

    Args:
        ref: hub id (e.g. `llava-hf/llava-1.5-7b-hf`) or a local `save_pretrained` folder.
        device: where to put the model.
        dtype: weight dtype; None keeps the stored one.

    Returns:
        (model in eval mode, processor).

    Raises:
        ModelLoadError: the folder is missing, the checkpoint cannot be loaded, or the processor
            has no chat template (prompts are built with `processor.apply_chat_template`).
    """
    model, processor = _load(
        ROLE_CAPTIONER, ref, LlavaForConditionalGeneration, LlavaProcessor, device, dtype
    )
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"{ROLE_CAPTIONER}: processor of {os.fspath(ref)!r} has no chat template")
    return model, processor


def read_tag_vocabulary(path: str | os.PathLike) -> list[str]:
    """Read a tag list: one tag per line; blank lines and `#` comments are ignored.

    Used for both the tag vocabulary and the non-entity exclusion list. Tags are stripped and
    lowercased; duplicates are dropped, first occurrence kept.

    Args:
        path: a text file, or `"builtin"` for `BUILTIN_TAG_VOCABULARY`.

    Returns:
        The tags in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no tag.
    """
    file = BUILTIN_TAG_VOCABULARY if os.fspath(path) == BUILTIN else Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tag list {os.fspath(path)!r} does not exist")
    tags: dict[str, None] = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        tag = line.split("#", 1)[0].strip().lower()
        if tag:
            tags[tag] = None
    if not tags:
        raise ValueError(f"tag list {os.fspath(path)!r} is empty (one tag per line; '#' starts a comment)")
    return list(tags)
