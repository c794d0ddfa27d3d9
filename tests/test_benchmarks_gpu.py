"""`make bench-gpu` (benchmarks/bench_gpu.py) at tiny sizes on the CPU, so the GPU scripts cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_gpu  # noqa: E402


@pytest.mark.slow
def test_bench_gpu_tiny_on_cpu_writes_one_json_per_benchmark_and_a_table(tmp_path, tiny_zoo):
    # gpu_ram.py and gpu_eval.py belong to the tagger and the evaluation harness, whose tests run them.
    only = "inference,inference-sdxl,train,engine"
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--device", "cpu", "--out",
                           str(tmp_path), "--only", only], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    present = [n for n, script, *_ in bench_gpu.BENCHMARKS if n in only.split(",") and (REPO / "benchmarks" / script).exists()]
    summary = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [r["benchmark"] for r in summary["benchmarks"]] == present
    assert summary["tiny"] is True and summary["torch"] and "cuda" in summary
    for record in summary["benchmarks"]:
        assert record["status"] == "ok", record
        assert json.loads((tmp_path / f"{record['benchmark']}.json").read_text()) == record
    results = {r["benchmark"]: r["result"] for r in summary["benchmarks"]}
    inference = results["inference"]["results"]
    assert {"diffusers_inpaint", "largen_refine_off", "largen_refine_on", "largen_refine_on_channels_last"} <= set(inference)
    assert not any(k.startswith("sdxl_") for k in inference)  # those run apart, as inference-sdxl
    sdxl = results["inference-sdxl"]["results"]
    assert set(sdxl) == {"sdxl_diffusers_inpaint", "sdxl_largen_refine_off", "sdxl_largen_refine_on"}
    assert all(v["s_per_image"] > 0 for v in sdxl.values())
    assert all(v["s_per_image"] > 0 and v["s_per_step"] > 0 for v in inference.values())
    stages = results["train"]["stages"]
    assert [(s["stage"], s["channels_last"]) for s in stages] == [(1, False), (1, True), (2, False), (2, True)]
    assert all(s["samples_per_s"] > 0 for s in stages)
    engine = results["engine"]
    assert set(engine["stage_share"]) == {"tag", "ground", "segment", "caption"}
    assert abs(sum(engine["stage_share"].values()) - 1) < 0.01 and engine["images_per_s_per_gpu"] > 0
    table = (tmp_path / "summary.md").read_text()
    assert "| benchmark | variant | figures |" in table and "largen_refine_on" in table and "images/s per GPU" in table
    assert table in done.stdout


def test_a_failing_benchmark_is_recorded_and_the_runner_exits_1(tmp_path):
    script = tmp_path / "gpu_broken.py"
    script.write_text("import sys\nprint('{\"partial\": 1}')\nprint('boom: out of memory', file=sys.stderr)\nsys.exit(3)\n")
    record = bench_gpu.run_one("broken", script, "cpu", True, 60, tmp_path)
    # Its one complete line is kept, marked partial, with the error.
    assert record["status"] == "partial" and record["returncode"] == 3 and "out of memory" in record["error"]
    assert record["result"] == {"partial": 1}
    assert json.loads((tmp_path / "broken.json").read_text()) == record
    assert bench_gpu.summary_rows(record)[0] == ("broken", "**partial**", record["error"])
    script.write_text("import sys\nprint('no json here')\nsys.exit(1)\n")
    record = bench_gpu.run_one("broken", script, "cpu", True, 60, tmp_path)
    assert record["status"] == "failed" and "result" not in record
    assert bench_gpu.summary_rows(record) == [("broken", "**failed**", record["error"])]


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "inference,nope"], "--only: unknown benchmark nope"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU here"),
])
def test_bench_gpu_bad_arguments_are_one_line(args, message, tmp_path):
    # No GPU visible, so the "no CUDA GPU here" refusal is checked on a machine with one too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--out", str(tmp_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_gpu.py: error: ") and message in last and "Traceback" not in done.stderr
