"""Quality filters and caption modes: near-duplicate sources across shards and resume, SAM mask quality,
CLIP caption ↔ crop agreement, `caption.mode` regional / global / both, and the trainer's caption key."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from dataengine.dedup import HashedImage, find_duplicates, hamming, phash_of
from dataengine.engine import mine
from dataengine.inputs import InputItem, write_sample_images
from dataengine.schema import decode_sample
from dataengine.stages.base import NO_INSTANCES, ImageRecord, Instance
from dataengine.stages.caption import CaptionStage
from dataengine.stages.encode import EncodeStage
from dataengine.stages.filter import AgreementStage, FilterStage
from dataengine.stages.segment import stability_scores

from .conftest import tiny_config

# One xdist worker for the module: its mining run (`dedup_run`) is then made once, not per worker.
pytestmark = pytest.mark.xdist_group("dataengine-filters")

# ----------------------------------------------------------------------------- near duplicates


def h(uri: str, sid: str, phash: str) -> HashedImage:
    return HashedImage(uri=uri, source_id=sid, phash=phash)


def test_duplicate_rule_keeps_the_first_in_input_order():
    images = [
        h("a", "a" * 16, "ffff000000000000"),
        h("b", "b" * 16, "0000ffff00000000"),
        h("a-copy", "a" * 16, "ffff000000000000"),  # same bytes as a
        h("a-near", "c" * 16, "ffff00000000000f"),  # 4 bits from a
        h("a-near-near", "d" * 16, "ffff0000000000ff"),  # 4 from a-near, 8 from a: a-near is no reference
        h("broken", "e" * 16, ""),  # not decodable: never a duplicate by pixels
    ]
    found = find_duplicates(images, max_distance=4)
    assert sorted(found) == [2, 3]
    assert (found[2].reason, found[2].of, found[2].distance) == ("duplicate_source", "a" * 16, 0)
    assert (found[3].reason, found[3].of, found[3].distance) == ("near_duplicate", "a" * 16, 4)
    assert "near duplicate of aaaaaaaaaaaaaaaa (a), pHash distance 4" in found[3].detail()
    assert sorted(find_duplicates(images, max_distance=3)) == [2]
    assert sorted(find_duplicates(images, max_distance=8)) == [2, 3, 4]
    # The earliest reference wins even when a later one is closer.
    two = [h("x", "1" * 16, "0" * 16), h("y", "2" * 16, "00000000000000ff"), h("z", "3" * 16, "000000000000007f")]
    assert find_duplicates(two, max_distance=8)[1].of == "1" * 16
    assert find_duplicates(two, max_distance=8)[2].of == "1" * 16


def test_phash_margins_on_the_sample_photos(sample_images):
    """Measured: a resize + JPEG re-encode is 0 bits away, the six distinct photos 26 to 38 apart (asserted with margins)."""
    photos = [Image.open(p).convert("RGB") for p in sorted(sample_images.iterdir())]
    hashes = [phash_of(p) for p in photos]
    for photo, ref in zip(photos, hashes):
        buf = io.BytesIO()
        photo.resize((photo.width * 9 // 10, photo.height * 9 // 10)).save(buf, format="JPEG", quality=70)
        assert hamming(ref, phash_of(Image.open(buf).convert("RGB"))) <= 2
    apart = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(apart) >= 16


@pytest.fixture(scope="module")
def dedup_run(repo_root, tiny_zoo, tmp_path_factory):
    """Four inputs, one per shard: a photo, another photo, an exact copy of the first, a re-encoded resize of it.

    Mined in one process with `caption.mode: both` (the engine's Ray path runs the same stages and
    plan; tests/dataengine/test_engine.py checks that both give the same bytes). Not square: the tiny
    Grounding DINO cannot take a lone square image (a 1x1 feature map in its group norm).
    """
    root = tmp_path_factory.mktemp("dedup")
    photos = root / "photos"
    write_sample_images(photos)
    inputs = root / "inputs"
    inputs.mkdir()
    a = Image.open(photos / "astronaut.png").convert("RGB").resize((200, 150))
    a.save(inputs / "0_a.png")
    Image.open(photos / "coffee.png").convert("RGB").resize((180, 120)).save(inputs / "1_b.png")
    (inputs / "2_a_copy.png").write_bytes((inputs / "0_a.png").read_bytes())
    a.resize((190, 142)).save(inputs / "3_a_near.jpg", quality=80)
    overrides = (
        f"inputs=[{{kind: images, path: '{inputs}', images_per_shard: 1}}]",
        "caption.mode=both",
        "filter.max_instances=1",
    )
    cfg = tiny_config(repo_root, overrides=overrides)
    out = root / "mined"
    summary = mine(cfg, out, backend="local", progress=False)
    return cfg, out, summary


def _rows(folder: Path) -> dict[str, dict]:
    return {Path(r["uri"]).name: r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def _samples(folder: Path) -> list:
    return [
        decode_sample(raw)
        for tar in sorted(folder.rglob("*.tar"))
        for raw in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
    ]


def test_duplicates_across_shards_are_recorded_and_not_mined(dedup_run):
    cfg, out, summary = dedup_run
    rows = _rows(out)
    sid_a = rows["0_a.png"]["source_id"]
    assert rows["0_a.png"]["status"] == rows["1_b.png"]["status"] == "ok"
    assert rows["0_a.png"]["duplicate_of"] is None and len(rows["0_a.png"]["phash"]) == 16
    copy, near = rows["2_a_copy.png"], rows["3_a_near.jpg"]
    assert (copy["status"], copy["duplicate_of"], copy["instances"]) == (NO_INSTANCES, sid_a, 0)
    assert copy["error"].startswith(f"dedup: same bytes as {sid_a}")
    assert (near["status"], near["duplicate_of"], near["instances"]) == (NO_INSTANCES, sid_a, 0)
    assert near["error"].startswith(f"dedup: near duplicate of {sid_a}") and near["source_id"] != sid_a
    # Counted in each shard's stats and in the run's summary; the duplicates never reached a model.
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert stats[2]["drops"] == {"duplicate_source": 1} and stats[3]["drops"] == {"near_duplicate": 1}
    assert stats[3]["stage_images_in"] == {"dedup": 1, "encode": 1}
    assert stats[0]["stage_items_out"]["dedup"] == 1
    table = summary.table()
    assert "near_duplicate" in table and "duplicate_source" in table
    assert f"python -m dataengine.preview {out}" in table
    assert {s.meta.source_id for s in _samples(out)} == {sid_a, rows["1_b.png"]["source_id"]}


def test_a_resumed_run_decides_duplicates_exactly_as_before(dedup_run):
    cfg, out, _ = dedup_run
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}
    for shard in (1, 2, 3):  # uncommitted: the rerun mines them, with shard 0's hashes from its parquet
        (out / f"{shard:06d}_stats.json").unlink()
    summary = mine(cfg, out, backend="local", progress=False)
    assert (summary.shards_skipped, summary.shards_written) == (1, 3)
    after = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}
    assert after == before


def test_caption_mode_both_stores_both_and_the_trainer_picks_one(dedup_run):
    from training.config import DataConfig
    from training.data import CaptionMissingError, caption_of

    _, out, _ = dedup_run
    samples = _samples(out)
    assert samples
    for q in samples:
        assert set(q.meta.captions) == {"regional", "global"} and q.text == q.meta.captions["regional"]
        assert caption_of(q, "regional") == q.text and caption_of(q, "global") == q.meta.captions["global"]
        assert q.meta.clip_score is not None and q.meta.mask_stability is not None
        assert set(q.meta.models) >= {"clip", "captioner"}
    # A sample mined regional-only (or before captions existed) has no global caption: a clear error.
    regional_only = samples[0]
    regional_only.meta = regional_only.meta.model_copy(update={"captions": None})
    assert caption_of(regional_only, "regional") == regional_only.text
    with pytest.raises(CaptionMissingError, match="no 'global' caption .*caption.mode: global or both"):
        caption_of(regional_only, "global")
    assert DataConfig(shards=["x.tar"]).caption == "regional"
    with pytest.raises(ValueError, match="caption"):
        DataConfig(shards=["x.tar"], caption="scene")


def test_make_shards_keeps_the_new_fields_and_validates(dedup_run, tmp_path):
    from dataengine.release import build_release
    from dataengine.validate import validate_release

    _, out, summary = dedup_run
    release = tmp_path / "release"
    built = build_release([out], release, seed=0, val_fraction=0.0, samples_per_shard=10, card=False)
    assert sum(built.counts.values()) == summary.samples and built.rejected == 0
    report = validate_release(release)
    assert report.ok, report.text()
    released = _samples(release)
    assert {q.key for q in released} == {q.key for q in _samples(out)}
    assert all(set(q.meta.captions) == {"regional", "global"} and q.meta.clip_score is not None for q in released)


def test_preview_of_a_mined_run_shows_every_caption_and_score(dedup_run, tmp_path):
    from dataengine import preview

    _, out, summary = dedup_run
    target = tmp_path / "sheet.html"
    assert preview.main([str(out), "--out", str(target)]) == 0
    page = target.read_text()
    assert page.count('class="card"') == summary.samples
    assert "<b>global</b>" in page and "<b>regional</b>" in page and "stability" in page and "CLIP" in page
    assert "near_duplicate" in page  # the run's drop reasons


# ----------------------------------------------------------------------------- mask quality


def test_stability_score_is_the_iou_of_the_masks_at_plus_and_minus_offset():
    logits = torch.full((2, 8, 8), -5.0)
    logits[0, :4, :4] = 3.0  # a sharp 16-pixel mask: every logit far from 0
    logits[1, :4, :4] = 3.0
    logits[1, 4:, :4] = 0.5  # a soft rim of 16 pixels: inside at 0, out at +1, in at -1
    scores = stability_scores(logits, offset=1.0)
    assert scores.tolist() == pytest.approx([1.0, 0.5])
    assert stability_scores(torch.full((1, 4, 4), -9.0), offset=1.0).tolist() == [0.0]  # empty: 0, not NaN


def _record(image: np.ndarray, instances: list[Instance]) -> ImageRecord:
    record = ImageRecord(shard=0, index=0, item=InputItem(uri="x", path="x"), image=image)
    record.source_id = "0123456789abcdef"
    record.size = image.shape[:2]
    record.instances = instances
    return record


def test_mask_quality_filters_drop_with_their_reasons(sample_cfg):
    cfg = sample_cfg.model_copy(deep=True)
    cfg.pipeline.filter = cfg.pipeline.filter.model_copy(update={"min_mask_score": 0.7, "min_mask_stability": 0.9})
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True

    def inst(iou, stability):
        return Instance("cup", [10, 10, 30, 30], 0.9, 0.9, mask=mask, mask_score=iou, mask_stability=stability)

    record = _record(np.zeros((64, 64, 3), np.uint8), [inst(0.95, 0.95), inst(0.5, 0.99), inst(0.95, 0.8)])
    FilterStage(cfg).run([record])
    assert dict(record.drops) == {"mask_score_low": 1, "mask_unstable": 1}
    assert [(i.mask_score, i.mask_stability) for i in record.instances] == [(0.95, 0.95)]


# ----------------------------------------------------------------------------- caption <-> crop agreement


def _crops_and_record(seed: int = 0) -> ImageRecord:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[4:40, 4:60] = True
    instances = []
    for n, (box, caption) in enumerate(
        [([4, 4, 30, 40], "a red cup on a table"), ([30, 4, 60, 40], "a bicycle leaning on a wall"),
         ([10, 10, 50, 30], "a dog asleep")]
    ):  # fmt: skip
        x0, y0, x1, y1 = box
        subject = np.dstack([image[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
        instances.append(Instance("cup", box, 0.9 - n / 10, 0.9, mask=mask, subject=subject, caption=caption))
    return _record(image, instances)


def test_agreement_stores_clip_scores_and_drops_the_mismatches(sample_cfg):
    stage = AgreementStage(sample_cfg)
    record = _crops_and_record()
    crops = [Image.fromarray(i.subject[..., :3]) for i in record.instances]
    scores = stage.scores(crops, [i.caption for i in record.instances])
    # Cosine similarities; a batch gives what one pair at a time gives (measured: 4e-8 apart).
    assert all(-1 <= s <= 1 for s in scores)
    singles = [stage.scores([c], [i.caption])[0] for c, i in zip(crops, record.instances)]
    assert singles == pytest.approx(scores, abs=1e-4)
    order = sorted(range(3), key=lambda n: scores[n])
    stage.min_score = (scores[order[0]] + scores[order[1]]) / 2  # drops exactly the worst-matching one
    stage.run([record])
    assert dict(record.drops) == {"caption_crop_mismatch": 1}
    assert [i.caption for i in record.instances] == [
        c for n, c in enumerate(["a red cup on a table", "a bicycle leaning on a wall", "a dog asleep"]) if n != order[0]
    ]
    assert all(i.clip_score is not None for i in record.instances)
    record = _crops_and_record()
    stage.min_score = 1.0
    stage.run([record])
    assert record.status == NO_INSTANCES and record.drops == {"caption_crop_mismatch": 3, "all_captions_mismatched": 1}

    global_cfg = sample_cfg.model_copy(deep=True)
    global_cfg.pipeline.caption = global_cfg.pipeline.caption.model_copy(update={"mode": "global"})
    idle = AgreementStage(global_cfg)
    assert not hasattr(idle, "model") and not idle.wants(_crops_and_record())


# ----------------------------------------------------------------------------- caption.mode


def test_caption_mode_global_captions_the_whole_image_once(sample_cfg):
    cfg = sample_cfg.model_copy(deep=True)
    cfg.pipeline.caption = cfg.pipeline.caption.model_copy(update={"mode": "global"})
    stage = CaptionStage(cfg)
    record = _crops_and_record()
    stage.run([record])
    assert record.global_caption and all(i.caption == "" for i in record.instances)
    assert record.counts["caption"] == 3
    # Greedy and deterministic: the same as captioning the image alone with the global prompt.
    alone = stage.generate([Image.fromarray(record.image)], [stage.chat(cfg.pipeline.caption.global_prompt)])
    assert alone == [record.global_caption]

    for inst in record.instances:
        inst.mask_stability, inst.mask_score = 0.5, 0.5
    encoder = EncodeStage(cfg)
    samples = [decode_sample(s) for s in encoder.encode(record)]
    assert [q.text for q in samples] == [record.global_caption] * 3
    assert all(q.meta.captions == {"global": record.global_caption} and q.meta.clip_score is None for q in samples)
    assert "clip" not in samples[0].meta.models

    # An unusable global caption drops the image's instances under the caption's reason.
    stage.ccfg = stage.ccfg.model_copy(update={"min_words": 1000})
    record = _crops_and_record()
    stage.run([record])
    assert record.status == NO_INSTANCES and record.drops["caption_too_short"] == 3
