"""Tiny data-engine checkpoints: built by the zoo script, loaded by `dataengine.models`, run once each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataengine import tiny_models
from dataengine.models import (
    BUILTIN_NON_ENTITY_TAGS,
    BUILTIN_TAG_VOCABULARY,
    ModelLoadError,
    load_captioner,
    load_grounding,
    load_segmenter,
    load_tagger,
    read_tag_vocabulary,
)
from scripts.make_tiny_models import build_zoo

NAMES = ["clip-tagger", "grounding-dino", "sam", "llava"]
HEIGHT, WIDTH = 48, 80  # not square, not the models' input size: exercises resize and padding


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("tiny-zoo"), only=NAMES, quiet=True)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def test_builders_are_the_documented_set():
    # ram-plus is a .pth in the published RAM++ layout on purpose (the real file's loader reads it),
    # so it is not one of NAMES, whose checkpoints must be safetensors.
    assert set(tiny_models.BUILDERS) == set(NAMES) | {"ram-plus"}
    assert tiny_models.RECIPE_VERSION == "2"


def test_checkpoints_are_small_and_safetensors(zoo):
    for name in NAMES:
        files = [p for p in (zoo / name).rglob("*") if p.is_file()]
        assert any(p.name == "model.safetensors" for p in files), name
        assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in files), name
        assert sum(p.stat().st_size for p in files) < 4_000_000, name


def test_clip_tagger_zero_shot_logits(zoo, image):
    model, processor = load_tagger(zoo / "clip-tagger")
    assert not model.training
    tags = read_tag_vocabulary(zoo / "clip-tagger" / "tag_vocabulary.txt")
    assert "sky" in tags and "dog" in tags
    inputs = processor(
        text=[f"a photo of a {t}" for t in tags], images=image, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, len(tags))
    assert torch.isfinite(logits).all()


def test_grounding_dino_boxes_for_text_prompt(zoo, image):
    model, processor = load_grounding(zoo / "grounding-dino")
    inputs = processor(images=image, text="cat . dog .", return_tensors="pt")
    # Grounding DINO splits phrases on bert-base-uncased ids: [CLS]=101, "."=1012, [SEP]=102.
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(1012) == 2
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (1, model.config.num_queries, model.config.max_text_len)
    results = processor.post_process_grounded_object_detection(
        outputs,
        input_ids=inputs["input_ids"],
        threshold=0.0,
        text_threshold=0.0,
        target_sizes=[(HEIGHT, WIDTH)],
    )
    boxes = results[0]["boxes"]
    assert boxes.shape == (model.config.num_queries, 4)
    assert len(results[0]["text_labels"]) == model.config.num_queries
    assert all(isinstance(label, str) for label in results[0]["text_labels"])
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


@pytest.mark.parametrize("side", [32, 64, 256])
def test_grounding_dino_grounds_a_square_image_alone(zoo, side):
    """A square image on its own in a batch (no wider neighbour to pad it) is 64 x 64 for the tiny
    processor; every feature level must still hold more than one position."""
    model, processor = load_grounding(zoo / "grounding-dino")
    square = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
    inputs = processor(images=square, text="cat .", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.pred_boxes.shape == (1, model.config.num_queries, 4)
    assert torch.isfinite(outputs.logits[..., : inputs["input_ids"].shape[1]]).all()  # -inf past the text


def test_sam_masks_for_two_boxes(zoo, image):
    model, processor = load_segmenter(zoo / "sam")
    boxes = [[[4.0, 4.0, 40.0, 30.0], [30.0, 10.0, 76.0, 44.0]]]  # one image, two boxes, xyxy pixels
    inputs = processor(images=image, input_boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    assert outputs.pred_masks.shape[:3] == (1, 2, 1)
    assert outputs.iou_scores.shape == (1, 2, 1)
    masks = processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (2, 1, HEIGHT, WIDTH)
    assert masks[0].dtype == torch.bool


def test_llava_generates_a_caption(zoo, image):
    model, processor = load_captioner(zoo / "llava")
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe the object briefly."}],
        }
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe the object briefly. ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == model.config.image_seq_length
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 4
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_second_build_changes_nothing(zoo):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in zoo.rglob("*") if p.is_file()}
    build_zoo(zoo, only=NAMES, quiet=True)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in zoo.rglob("*") if p.is_file()}
    assert after == before


def test_missing_local_folder_names_ref_and_role(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelLoadError, match="no-such-checkpoint") as info:
        load_segmenter(missing)
    assert "segmenter" in str(info.value)
    assert isinstance(info.value, OSError)


def test_wrong_checkpoint_kind_names_ref_and_role(zoo):
    with pytest.raises(ModelLoadError, match="grounding: .*'sam' checkpoint"):
        load_grounding(zoo / "sam")


def test_builtin_tag_lists(tmp_path):
    vocabulary = read_tag_vocabulary(BUILTIN_TAG_VOCABULARY)
    non_entities = read_tag_vocabulary(BUILTIN_NON_ENTITY_TAGS)
    assert len(vocabulary) >= 200 and "dog" in vocabulary and "#" not in "".join(vocabulary)
    assert "sky" in non_entities and "skin" in non_entities
    assert not set(vocabulary) & set(non_entities)
    assert read_tag_vocabulary("builtin") == vocabulary

    listed = tmp_path / "tags.txt"
    listed.write_text("# comment\n\nDog\ncat  # pet\ndog\n")
    assert read_tag_vocabulary(listed) == ["dog", "cat"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_tag_vocabulary(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_tag_vocabulary(tmp_path / "missing.txt")
