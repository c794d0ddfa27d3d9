"""The streaming quadruplet loader: shapes, splitting, resume, augmentation, dropout, broken samples."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from training.config import DataConfig
from training.data import (
    LoaderState,
    QuadrupletStream,
    TrainingExampleBuilder,
    augment_mask,
    expand_shards,
    make_dataloader,
    pixels_to_unit_range,
    read_quadruplets,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_zoo / "sd-inpainting", subfolder="tokenizer")


def make_stream(shards, tokenizer, rank=0, world_size=1, state=None, seed=0, **overrides) -> QuadrupletStream:
    cfg = DataConfig.model_validate({"shards": shards, "resolution": 64, "batch_size": 2, "num_workers": 0,
                                     "shuffle_buffer": 8, "shuffle_initial": 4, **overrides})
    builder = TrainingExampleBuilder(cfg, tokenizer, clip_size=32, refine_size=64)
    return QuadrupletStream(cfg, builder, seed=seed, rank=rank, world_size=world_size, state=state)


def take(stream: QuadrupletStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(make_dataloader(stream)), n))


def test_batches_have_the_model_input_contract(synthetic_shards, tokenizer):
    batch = take(make_stream(synthetic_shards, tokenizer, batch_size=4), 1)[0]
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 1, 64, 64) and batch["mask"].dtype == torch.uint8
    assert batch["clip_pixels"].shape == (4, 3, 32, 32)
    assert batch["refine_pixels"].shape == (4, 3, 64, 64)
    assert batch["input_ids"].shape == (4, tokenizer.model_max_length)
    assert batch["input_ids"].dtype == torch.long
    pixels = pixels_to_unit_range(batch["pixel_values"])
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.dtype == torch.float32
    assert batch["refine_pixels"].min() >= -1 and batch["refine_pixels"].max() <= 1
    assert set(batch["mask"].unique().tolist()) == {0, 1}
    assert len(batch["key"]) == 4 and batch["__cursor__"] >= 4


def test_zoom_crop_centres_the_instance(synthetic_shards, tokenizer):
    # With the box expanded x1.1 the instance fills most of the crop.
    batch = take(make_stream(synthetic_shards, tokenizer, batch_size=4,
                             zoom={"min_expansion": 1.1, "max_expansion": 1.1},
                             mask={"precise": 1, "box": 0, "dilated": 0}), 1)[0]
    frac = batch["mask"].float().mean(dim=(1, 2, 3))
    assert torch.all(frac > 0.45), frac


def test_shards_accept_brace_patterns_and_fsspec_urls(synthetic_shards, tokenizer):
    folder = Path(synthetic_shards[0]).parent
    assert expand_shards(f"{folder}/{{000000..000003}}.tar") == synthetic_shards
    keys_local = [k for b in take(make_stream(synthetic_shards, tokenizer, resampled=False, shuffle_buffer=1), 3) for k in b["key"]]
    url = f"file://{folder}/{{000000..000003}}.tar"
    keys_url = [k for b in take(make_stream([url], tokenizer, resampled=False, shuffle_buffer=1), 3) for k in b["key"]]
    assert keys_local == keys_url


def test_epoch_mode_splits_over_nodes_and_workers_without_overlap(synthetic_shards, tokenizer):
    seen: list[str] = []
    for rank in range(2):
        stream = make_stream(synthetic_shards, tokenizer, rank=rank, world_size=2, resampled=False, shuffle_buffer=1,
                             batch_size=1, num_workers=2)
        # 24 samples over 2 processes x 2 workers: 6 per worker role, 12 per process per epoch
        # (no shuffle buffer: a buffer would mix the next epoch in before this one ends).
        seen += [k for b in take(stream, 12) for k in b["key"]]
    assert len(seen) == 24
    assert len(set(seen)) == 24


def test_resume_continues_the_exact_batch_sequence(synthetic_shards, tokenizer):
    stream = make_stream(synthetic_shards, tokenizer, num_workers=2, resampled=True)
    state = LoaderState(num_workers=2)
    batches = take(stream, 5)
    for batch in batches[:3]:
        state.update(batch)
    resumed = take(make_stream(synthetic_shards, tokenizer, num_workers=2, resampled=True,
                               state=copy.deepcopy(state)), 2)
    for a, b in zip(batches[3:], resumed):
        assert a["key"] == b["key"]
        for name in ("pixel_values", "mask", "clip_pixels", "input_ids", "drop_text", "drop_image"):
            assert torch.equal(a[name], b[name]), name
    assert LoaderState.from_json(state.to_json()) == state


def test_condition_dropout(synthetic_shards, tokenizer):
    builder_ids = TrainingExampleBuilder(DataConfig(shards=["x"]), tokenizer, 32, 64).tokenize("")
    text = take(make_stream(synthetic_shards, tokenizer, batch_size=4, dropout={"text": 1, "image": 0}), 1)[0]
    assert text["drop_text"].all() and not text["drop_image"].any()
    assert all(torch.equal(ids, builder_ids) for ids in text["input_ids"])
    image = take(make_stream(synthetic_shards, tokenizer, batch_size=4, dropout={"text": 0, "image": 1}), 1)[0]
    assert image["drop_image"].all() and not image["drop_text"].any()
    assert not any(torch.equal(ids, builder_ids) for ids in image["input_ids"])
    both = take(make_stream(synthetic_shards, tokenizer, batch_size=4, dropout={"text": 1, "image": 1}), 1)[0]
    assert both["drop_image"].all() and both["drop_text"].all()
    none = take(make_stream(synthetic_shards, tokenizer, batch_size=4, dropout={"text": 0, "image": 0}), 1)[0]
    assert not none["drop_image"].any() and not none["drop_text"].any()


def test_condition_dropout_is_independent_per_condition():
    """Paper 4.5: text and image are dropped independently, so all four combinations occur."""
    import random

    from training.data import TrainingExampleBuilder as Builder

    cfg = DataConfig(shards=["x"], dropout={"text": 0.5, "image": 0.5})
    assert cfg.dropout.text == 0.5 and not hasattr(cfg.dropout, "both")
    rng = random.Random(0)
    counts = {(t, i): 0 for t in (False, True) for i in (False, True)}
    for _ in range(4000):
        counts[Builder.draw_dropout(cfg.dropout, rng)] += 1
    # Each of the four combinations has probability 0.25; 4000 draws: std ~27, so 900..1100 is > 3.6 sigma.
    assert all(900 < n < 1100 for n in counts.values()), counts


def test_mask_augmentation_modes():
    yy, xx = np.mgrid[:64, :64]
    mask = (((yy - 30) ** 2 + (xx - 34) ** 2) < 15**2).astype(np.uint8)
    only = {"precise": {"precise": 1, "box": 0, "dilated": 0}, "box": {"precise": 0, "box": 1, "dilated": 0},
            "dilated": {"precise": 0, "box": 0, "dilated": 1}}
    outs = {}
    for mode, weights in only.items():
        cfg = DataConfig(shards=["x"], mask=weights)
        outs[mode], got = augment_mask(mask, cfg, __import__("random").Random(0))
        assert got == mode
    assert np.array_equal(outs["precise"], mask)
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    assert np.array_equal(outs["box"], box)
    assert np.all(outs["dilated"] >= mask) and outs["dilated"].sum() > mask.sum()


def test_broken_samples_are_skipped_and_counted(corrupt_shard, tokenizer):
    path, expected = corrupt_shard
    stream = make_stream([path], tokenizer, resampled=False, shuffle_buffer=1, batch_size=1)
    batches = take(stream, 7)  # 6 good samples, then the first of the second epoch
    keys = [b["key"][0] for b in batches]
    assert keys[:6] == [q.key for q in read_quadruplets([path], 6)]
    assert keys[6] == keys[0]
    assert batches[6]["__skipped__"] == expected
    state = LoaderState(num_workers=1)
    for b in batches:
        state.update(b)
    assert state.skipped_total() == expected


def test_a_stream_of_only_broken_samples_fails_clearly(corrupt_shard, tokenizer, tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"garbage" * 1000)
    from training.data import NoSamplesError

    with pytest.raises(NoSamplesError, match="no sample"):
        take(make_stream([str(path)], tokenizer, resampled=False), 1)


def test_stage1_batches_skip_the_refinenet_input_and_keep_the_rest(synthetic_shards, tokenizer):
    full = take(make_stream(synthetic_shards, tokenizer, batch_size=2), 2)
    stream = make_stream(synthetic_shards, tokenizer, batch_size=2)
    stream.builder.refine = False  # what the trainer builds for stage 1
    stage1 = take(stream, 2)
    for a, b in zip(full, stage1):
        assert "refine_pixels" not in b and a["key"] == b["key"]
        for name in ("pixel_values", "mask", "clip_pixels", "input_ids", "drop_text", "drop_image"):
            assert torch.equal(a[name], b[name]), name
