"""The harness without the diffusion models: sharding, a failing case, resume, the merge; and bad
`largen eval run` input (one line naming the path or option, exit status 2, before any case runs)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from evaluation.benchmark import load_cases
from evaluation.harness import RunSettings, record_run, run_pairs, shard_cases
from evaluation.report import write_report
from evaluation.rows import GROUPS, ROWS, fit_size, resolve_rows
from inference.cli import main


def _paint(row, case, scene, subject, margin):
    """A stand-in row: the subject pasted into the box; fails for one chosen case."""
    if case["case_id"].endswith("__01") and case["subject"] == "red_ball":
        raise RuntimeError("this case fails on purpose")
    out = scene.copy()
    x0, y0, x1, y1 = (int(v) for v in case["box"])
    out.paste(subject.convert("RGB").resize((x1 - x0, y1 - y0)), (x0, y0))
    ImageDraw.Draw(out).point((0, 0), fill=(1, 2, 3))  # one background pixel, so changed_bg is known
    return out


def _settings(bench, out, shard=(0, 1)) -> RunSettings:
    return RunSettings(bench=str(bench), out=str(out), rows=["largen-b0.3"], model="m", refs={}, steps=1,
                       guidance=7.5, device="cpu", shard=shard, bench_cases=len(load_cases(bench)))


def test_shards_merge_to_the_unsharded_result_and_a_failing_case_is_recorded(synthetic_bench, scorer, tmp_path):
    cases, row = load_cases(synthetic_bench), [ROWS["largen-b0.3"]]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out in (whole, split):
        record_run(out, _settings(synthetic_bench, out))
    counts = run_pairs(whole, synthetic_bench, row, cases, _paint, scorer, progress=False)
    assert counts == {"done": 3, "skipped": 0, "failed": 1}
    for index in (0, 1):
        run_pairs(split, synthetic_bench, row, shard_cases(cases, index, 2), _paint, scorer, progress=False, process=index)
    a = pq.read_table(write_report(whole) and whole / "results.parquet").to_pylist()
    b = pq.read_table(write_report(split) and split / "results.parquet").to_pylist()
    strip = ("seconds", "process")
    assert [{k: v for k, v in r.items() if k not in strip} for r in a] == [
        {k: v for k, v in r.items() if k not in strip} for r in b
    ]
    failed = [r for r in a if r["status"] == "failed"]
    assert len(failed) == 1 and "this case fails on purpose" in failed[0]["error"] and "test_harness.py" in failed[0]["error"]
    ok = [r for r in a if r["status"] == "ok"]
    scene = Image.open(synthetic_bench / cases[0]["scene_path"])
    for r in ok:
        assert r["changed_bg"] == pytest.approx(1 / (scene.width * scene.height - _covered(r, cases, scene)), rel=1e-6)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["rows"]["largen-b0.3"]["cases_ok"] == 3 and summary["cases_failed"] == 1
    # A rerun skips the scored cases and tries the failed one again.
    again = run_pairs(whole, synthetic_bench, row, cases, _paint, scorer, progress=False)
    assert again == {"done": 0, "skipped": 3, "failed": 1}


def _covered(record, cases, scene) -> int:
    """Pixels of the box grown by the record's margin (not background)."""
    from evaluation.metrics import background, box_mask

    case = next(c for c in cases if c["case_id"] == record["case_id"])
    return int((~background(box_mask(case["box"], scene.size), record["margin"])).sum())


def test_rows_and_groups():
    assert resolve_rows("table1") == list(GROUPS["table1"])
    assert resolve_rows("sweep,largen-b0.3")[2] == "largen-b0.3"  # beta 0.3 of the sweep is Table 1's row
    assert len(resolve_rows("all")) == len(ROWS)
    for bad, words in (("anydoor", "no diffusers implementation"), ("nope", "not a row or group"), (",", "names no row")):
        with pytest.raises(ValueError, match=words):
            resolve_rows(bad)
    assert fit_size((640, 480), 512) == (512, 384) and fit_size((100, 1000), 64) == (8, 64)


@pytest.fixture
def broken_bench(synthetic_bench, tmp_path):
    bench = shutil.copytree(synthetic_bench, tmp_path / "bench")
    case = load_cases(bench)[0]
    (bench / case["scene_path"]).write_bytes(b"\x89PNG broken")
    return bench, bench / case["scene_path"]


def test_bad_run_input_is_one_line_before_any_case(synthetic_bench, broken_bench, tiny_zoo, tmp_path, capsys):
    model = str(tiny_zoo / "largen-pipeline")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    bad_index = tmp_path / "badindex"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text(json.dumps({"_class_name": "LARGenPipeline", "unet": ["x", "Y"]}))
    shutil.copytree(tiny_zoo / "largen-pipeline" / "unet", bad_index / "unet")
    cases = [
        (["--bench", str(tmp_path / "nope")], "nope"),
        (["--bench", str(broken_bench[0])], str(broken_bench[1])),
        (["--model", str(not_a_model)], "no model_index.json"),
        (["--model", str(bad_index)], "cannot be loaded"),
        (["--rows", "anydoor"], "no diffusers implementation"),
        (["--rows", "paint-by-example", "--paint-by-example", str(not_a_model)], "--paint-by-example"),
        (["--shard", "2/2"], "--shard"),
        (["--steps", "0"], "--steps"),
    ]
    for extra, words in cases:
        out = tmp_path / f"out{len(words)}"
        argv = ["eval", "run", "--bench", str(synthetic_bench), "--out", str(out), "--model", model,
                "--profile", "tiny", "--rows", "largen-b0.3", "--no-progress", *extra]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert err.startswith("largen") and ": error: " in err and err.count("\n") == 1 and words in err, (extra, err)
        assert not out.exists(), extra
