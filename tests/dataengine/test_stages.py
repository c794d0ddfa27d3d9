"""Stages: each callable class gives identical outputs in a plain loop and as a Ray actor; a failing image is isolated."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from dataengine.engine import new_records
from dataengine.inputs import plan_shards
from dataengine.stages.base import FAILED, OK, PENDING, Instance, Stage, StageChain, make_batch
from dataengine.stages.caption import CaptionStage, caption_problem
from dataengine.stages.encode import EncodeStage
from dataengine.stages.filter import AgreementStage, FilterStage
from dataengine.stages.ground import GroundStage, nms, phrase_spans
from dataengine.stages.read import ReadStage
from dataengine.stages.segment import SegmentStage
from dataengine.stages.subject import SubjectStage, crop_box
from dataengine.stages.tag import TagStage

ORDER = [ReadStage, TagStage, GroundStage, SegmentStage, FilterStage, SubjectStage, CaptionStage, AgreementStage,
         EncodeStage]  # fmt: skip


def view(records) -> list:
    """Everything a stage produces, in a form `==` compares exactly (arrays as bytes)."""

    def arr(a):
        return None if a is None else (a.shape, str(a.dtype), a.tobytes())

    out = []
    for r in records:
        out.append(
            (
                r.index, r.source_id, r.status, r.error, arr(r.image), r.size, tuple(r.tags), dict(r.drops),
                dict(r.counts), [s for s in r.samples],
                [(i.tag, i.box, i.box_score, i.text_score, arr(i.mask), i.mask_score, i.mask_stability,
                  arr(i.subject), i.caption, i.clip_score) for i in r.instances],
                r.phash, r.duplicate_of, r.global_caption,
            )
        )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def shard(sample_cfg):
    return plan_shards(sample_cfg.pipeline.inputs)[0]


def test_every_stage_is_identical_in_a_plain_loop_and_under_ray(sample_cfg, shard, ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0.5)
    class StageActor:
        """Every stage class, built once inside one Ray actor (one process, models loaded once)."""

        def __init__(self, classes, cfg):
            self.stages = {cls.name: cls(cfg) for cls in classes}

        def call(self, name, batch):
            return self.stages[name](batch)

    actor = StageActor.remote(ORDER, sample_cfg)
    plain = {cls.name: cls(sample_cfg) for cls in ORDER}
    batch = make_batch(shard.index, new_records(shard))
    for cls in ORDER:
        local_out = plain[cls.name](copy.deepcopy(batch))
        ray_out = ray.get(actor.call.remote(cls.name, batch))
        assert view(ray_out["records"][0]) == view(local_out["records"][0]), cls.name
        batch = local_out
    records = batch["records"][0]
    assert all(r.status == OK for r in records)
    assert all(r.samples for r in records)
    ray.kill(actor)


class ExplodingTagStage(TagStage):
    """A test double: the tagger raises on one image (as a broken model or input would)."""

    name = "tag"

    def process(self, records):
        if any("chelsea" in r.uri for r in records):
            raise RuntimeError("tagger crashed")
        super().process(records)


def test_a_failing_image_is_isolated_and_the_rest_goes_on(sample_cfg):
    shards = plan_shards(sample_cfg.pipeline.inputs)
    records = [r for s in shards for r in new_records(s)][:4]  # astronaut, camera, chelsea, coffee
    ReadStage(sample_cfg).run(records)
    stage = ExplodingTagStage(sample_cfg)
    stage.batch_size = 4  # one chunk holding the culprit and three good images
    stage.run(records)
    failed = [r for r in records if r.status == FAILED]
    assert [r.uri.rsplit("/", 1)[1] for r in failed] == ["chelsea.png"]
    assert failed[0].error.startswith("tag: RuntimeError: tagger crashed (at test_stages.py:")
    assert all(r.tags and r.status == PENDING for r in records if r not in failed)
    assert all("tag" in r.seconds for r in records)


def test_chain_runs_stages_in_order(sample_cfg, shard):
    batch = make_batch(shard.index, new_records(shard))
    out = StageChain([ReadStage, TagStage], sample_cfg)(batch)
    assert all(r.tags for r in out["records"][0])


def test_base_stage_needs_process(sample_cfg):
    with pytest.raises(NotImplementedError):
        Stage(sample_cfg).process([])


def test_phrase_spans_and_truncation():
    ids = [101, 7, 8, 1012, 9, 1012, 102, 0]
    assert phrase_spans(ids, 2) == [[1, 2], [4]]
    with pytest.raises(ValueError, match="lower tag.top_k"):
        phrase_spans(ids, 3)


def test_nms_is_class_agnostic_and_ordered():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.7]), iou=0.5) == [1, 2]
    assert nms(boxes[:0], np.array([]), iou=0.5) == []


def test_filter_rules_count_each_reason(sample_cfg):
    cfg = sample_cfg.model_copy(deep=True)
    cfg.pipeline.filter = cfg.pipeline.filter.model_copy(
        update={"min_box_area_frac": 0.01, "max_box_area_frac": 0.5, "min_box_side": 4, "min_mask_score": 0.5, "max_instances": 1}
    )
    stage = FilterStage(cfg)
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True

    def inst(box, score=0.9, m=mask):
        return Instance(tag="dog", box=box, box_score=score, text_score=score, mask=m, mask_score=score)

    from dataengine.inputs import InputItem
    from dataengine.stages.base import ImageRecord

    record = ImageRecord(shard=0, index=0, item=InputItem(uri="x", path="x"), image=np.zeros((100, 100, 3), np.uint8))
    record.instances = [
        inst([0, 0, 5, 5]),  # 0.25 % of the image
        inst([0, 0, 90, 90]),  # 81 %
        inst([0, 0, 3, 60]),  # 1.8 % but 3 px wide
        inst([10, 10, 30, 30], m=np.zeros((100, 100), bool)),
        inst([10, 10, 30, 30], score=0.2),
        inst([10, 10, 30, 30]),
        inst([40, 40, 60, 60]),
    ]
    stage.run([record])
    assert dict(record.drops) == {
        "box_too_small": 1, "box_too_large": 1, "box_side_too_small": 1, "mask_empty": 1,
        "mask_score_low": 1, "over_max_instances": 1,
    }  # fmt: skip
    assert [i.box for i in record.instances] == [[10, 10, 30, 30]]


def test_subject_crop_is_rgba_with_mask_alpha(sample_cfg):
    from dataengine.inputs import InputItem
    from dataengine.stages.base import ImageRecord

    image = np.arange(50 * 40 * 3, dtype=np.uint8).reshape(50, 40, 3)
    mask = np.zeros((50, 40), bool)
    mask[10:20, 5:15] = True
    record = ImageRecord(shard=0, index=0, item=InputItem(uri="x", path="x"), image=image)
    record.instances = [Instance(tag="cup", box=[5.0, 10.0, 15.0, 20.0], box_score=1, text_score=1, mask=mask)]
    SubjectStage(sample_cfg).run([record])
    subject = record.instances[0].subject
    x0, y0, x1, y1 = crop_box([5.0, 10.0, 15.0, 20.0], sample_cfg.pipeline.subject.margin, 40, 50)
    assert subject.shape == (y1 - y0, x1 - x0, 4)
    np.testing.assert_array_equal(subject[..., :3], image[y0:y1, x0:x1])
    np.testing.assert_array_equal(subject[..., 3], mask[y0:y1, x0:x1] * 255)
    assert crop_box([0, 0, 0, 0], 0.1, 10, 10) == (0, 0, 1, 1)  # never empty


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "caption_empty"), ("  ...  ", "caption_empty"), ("dog", None), ("dog dog dog dog", "caption_degenerate"),
     ("a brown dog on grass", None)],
)  # fmt: skip
def test_caption_problems(text, problem):
    assert caption_problem(text, min_words=1) == problem
    assert caption_problem("dog", min_words=2) == "caption_too_short"


def test_every_model_stage_runs_in_bfloat16(sample_cfg, shard):
    """`engine.dtype` (auto: bfloat16 on CUDA): every model and its floating inputs take the dtype.

    Run here on CPU, where torch has bfloat16 kernels too: each stage loads its model in bfloat16,
    casts its processor's floating outputs to match, and the shard still mines into samples.
    """
    import torch

    from dataengine.stages.base import pick_dtype

    assert pick_dtype("auto", "cuda") == torch.bfloat16 and pick_dtype("auto", "cpu") == torch.float32
    cfg = sample_cfg.model_copy(deep=True)
    cfg.pipeline.engine = cfg.pipeline.engine.model_copy(update={"dtype": "bfloat16"})
    batch = make_batch(shard.index, new_records(shard))
    for cls in ORDER:
        stage = cls(cfg)
        for model in (getattr(stage, "model", None), getattr(getattr(stage, "tagger", None), "model", None)):
            if isinstance(model, torch.nn.Module):
                assert next(model.parameters()).dtype == torch.bfloat16, cls.name
        batch = stage(batch)
    records = batch["records"][0]
    assert all(r.status == OK for r in records), [(r.status, r.error) for r in records]
    assert all(r.samples for r in records)
