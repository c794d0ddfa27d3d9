"""QuadrupletWriter: deterministic bytes, atomic commit, resume checks, stats as the completion marker."""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from dataengine.inputs import InputItem, InputShard
from dataengine.shards import STATS_SUFFIX, QuadrupletWriter, ResumeError
from dataengine.stages.base import FAILED, OK, ImageRecord


def _records(shard: InputShard) -> list[ImageRecord]:
    ok = ImageRecord(shard=shard.index, index=0, item=shard.items[0], source_id="0123456789abcdef", status=OK, size=(4, 6))
    ok.tags = ["dog"]
    ok.samples = [{"__key__": "0123456789abcdef-000", "txt": b"a dog", "json": b"{}"}]
    ok.counts = {"read": 1, "tag": 1}
    ok.seconds = {"read": 0.5}
    bad = ImageRecord(shard=shard.index, index=1, item=shard.items[1], status=FAILED, error="read: empty file (0 bytes)")
    bad.drops["failed_read"] += 1
    return [bad, ok]  # any order: the writer sorts by index


@pytest.fixture()
def shard() -> InputShard:
    return InputShard(index=3, items=(InputItem(uri="a.png", path="a.png"), InputItem(uri="b.png", path="b.png")))


def test_commit_writes_tar_parquet_then_stats(tmp_path, sample_cfg, shard):
    writer = QuadrupletWriter(tmp_path, sample_cfg)
    stats = writer.commit(shard, _records(shard))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.parquet", "000003.tar", "000003_stats.json"]
    with tarfile.open(tmp_path / "000003.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["0123456789abcdef-000.json", "0123456789abcdef-000.txt"]
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "lar-gen", "lar-gen", 0o444)}
    rows = pq.read_table(tmp_path / "000003.parquet").to_pylist()
    assert [(r["index"], r["status"], r["error"], r["instances"]) for r in rows] == [
        (0, "ok", None, 1),
        (1, "failed", "read: empty file (0 bytes)", 0),
    ]
    assert rows[0]["keys"] == ["0123456789abcdef-000"] and rows[0]["width"] == 6
    on_disk = json.loads((tmp_path / f"000003{STATS_SUFFIX}").read_text())
    assert on_disk == stats
    assert stats["status"] == {"failed": 1, "no_instances": 0, "ok": 1}
    assert stats["drops"] == {"failed_read": 1} and stats["samples"] == 1
    assert stats["input_fingerprint"] == shard.fingerprint()


def test_same_records_same_bytes(tmp_path, sample_cfg, shard):
    a = QuadrupletWriter(tmp_path / "a", sample_cfg)
    b = QuadrupletWriter(tmp_path / "b", sample_cfg)
    a.commit(shard, _records(shard))
    b.commit(shard, _records(shard))
    for suffix in (".tar", ".parquet"):
        assert (tmp_path / "a" / f"000003{suffix}").read_bytes() == (tmp_path / "b" / f"000003{suffix}").read_bytes()


def test_a_failed_write_leaves_no_file_under_a_final_name(tmp_path, sample_cfg, shard):
    writer = QuadrupletWriter(tmp_path, sample_cfg)
    records = _records(shard)
    records[1].samples = [{"__key__": "bad", "txt": object()}]  # not bytes: the tar writer raises mid-shard
    with pytest.raises(ValueError):
        writer.commit(shard, records)
    assert list(tmp_path.iterdir()) == []


def test_resume_skips_committed_and_checks_inputs_and_config(tmp_path, sample_cfg, shard):
    writer = QuadrupletWriter(tmp_path, sample_cfg)
    other = InputShard(index=4, items=(InputItem(uri="c.png", path="c.png"),))
    assert writer.pending([shard, other]) == [shard, other]
    writer.commit(shard, _records(shard))
    (tmp_path / ".000004.tar.tmp").write_bytes(b"partial")  # left by a killed run
    writer = QuadrupletWriter(tmp_path, sample_cfg)
    assert not (tmp_path / ".000004.tar.tmp").exists()
    assert writer.pending([shard, other]) == [other]
    assert writer.pending([shard, other], overwrite=True) == [shard, other]
    assert not (tmp_path / "000003_stats.json").exists()

    writer.commit(shard, _records(shard))
    moved = InputShard(index=3, items=(InputItem(uri="z.png", path="z.png"),))
    with pytest.raises(ResumeError, match="other input images"):
        writer.pending([moved])
    changed = sample_cfg.model_copy(deep=True)
    changed.pipeline.ground = changed.pipeline.ground.model_copy(update={"nms_iou": 0.3})
    with pytest.raises(ResumeError, match="committed with config"):
        QuadrupletWriter(tmp_path, changed).pending([shard])


def test_records_must_match_the_shard(tmp_path, sample_cfg, shard):
    with pytest.raises(ValueError, match="got records"):
        QuadrupletWriter(tmp_path, sample_cfg).commit(shard, _records(shard)[:1])
