"""`make eval` end to end on the synthetic benchmark with the tiny zoo: every row, killed part-way,
then rerun to completion; every output file is checked, and the rerun must not rescore a case."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.benchmark import build_synthetic, load_cases
from evaluation.rows import ROWS
from inference.cli import main

KILL_AFTER_PARTS = 6
BASELINES = {"sd-inpainting", "locate", "paint-by-example", "sdiipa"}


def _parts(out):
    return sorted((out / "parts").glob("*/*.json")) if (out / "parts").is_dir() else []


def _killed_then_resumed(tmp, tiny_zoo, repo_root):
    """Build the benchmark, start `make eval` (every row), kill it part-way, rerun it to completion."""
    bench = build_synthetic(tmp / "bench", scenes=1, prompts_per_subject=1, size=64)
    out = tmp / "out"
    extra = f"--steps 1 --locate-model {tiny_zoo}/sd-inpainting --assign-model {tiny_zoo}/largen-pipeline --no-progress"
    cmd = ["make", "--no-print-directory", "-C", str(repo_root), "eval", f"MODEL={tiny_zoo}/largen-pipeline",
           f"BENCH={bench}", f"OUT={out}", "ROWS=all", "PROFILE=tiny", f"EVAL_ARGS={extra}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGEN_TINY_MODELS": str(tiny_zoo)}
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_parts(out)) < KILL_AFTER_PARTS and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group: make and largen
    first.wait()
    assert first.returncode != 0, "the first run finished before it could be killed"
    before = {p: p.stat().st_mtime_ns for p in _parts(out)}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    return bench, out, before, second.stdout


@pytest.mark.slow
def test_make_eval_end_to_end(tmp_path, tiny_zoo, repo_root, capsys):
    """One test, so that the two `make eval` runs happen once (pytest-xdist may split a module's
    tests over workers and set a module fixture up on each)."""
    e2e = _killed_then_resumed(tmp_path, tiny_zoo, repo_root)
    _resume_skips_every_scored_case(e2e)
    _every_row_every_case_and_the_results_table(e2e)
    _summary_table_and_figures(e2e)
    _report_command_rewrites_the_same_results(e2e, capsys)


def _resume_skips_every_scored_case(e2e):
    _, out, before, stdout = e2e
    assert len(before) >= KILL_AFTER_PARTS
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "a scored case was rewritten"
    assert f"{len(before)} already scored (skipped)" in stdout


def _every_row_every_case_and_the_results_table(e2e):
    bench, out, _, _ = e2e
    cases = load_cases(bench)
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert {(r["row"], r["case_id"]) for r in results} == {(row, c["case_id"]) for row in ROWS for c in cases}
    assert all(r["status"] == "ok" for r in results), [r["error"] for r in results if r["status"] != "ok"]
    seeds = {c["case_id"]: c["seed"] for c in cases}
    scene = Image.open(bench / cases[0]["scene_path"])
    for r in results:
        assert r["seed"] == seeds[r["case_id"]] and r["seconds"] > 0
        assert Image.open(out / r["image"]).size == scene.size
        for metric in ("clip_i", "clip_t", "dino_i"):
            assert -100.0 <= r[metric] <= 100.0
        if r["row"] in BASELINES:
            assert r["changed_bg"] > 0.5 and r["psnr_bg"] < 40  # the VAE round trip repaints the background
        else:
            assert r["changed_bg"] == 0.0 and r["psnr_bg"] == 100.0  # LAR-Gen pastes back: no pixel outside changes
    # Same model, same case seeds: the Locate row (given the SD-inpainting folder here) repeats SD-inpainting exactly.
    by = {(r["row"], r["case_id"]): r for r in results}
    for c in cases:
        a = Image.open(out / by[("locate", c["case_id"])]["image"])
        b = Image.open(out / by[("sd-inpainting", c["case_id"])]["image"])
        assert a.tobytes() == b.tobytes()


def _summary_table_and_figures(e2e):
    _, out, _, _ = e2e
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == set(ROWS) and summary["cases_failed"] == 0
    assert summary["rows"]["largen-b0.3"]["cases_ok"] == 2 and summary["settings"]["steps"] == 1
    table = (out / "table.md").read_text()
    for text in ("## Table 1", "## Table 2", "## Fig. 13", "| 68.68 | 30.37 |", "Anydoor (not run", "| 83.39 | 26.07 |",
                 "+ Locate mechanism", "| 0.9 |"):
        assert text in table, text
    for name in ("beta_sweep.png", "per_subject.png", "contact_sheet.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == (3 + len(ROWS)) * 96  # source, mask, subject, then one column per row


def _report_command_rewrites_the_same_results(e2e, capsys):
    _, out, _, _ = e2e
    before = pq.read_table(out / "results.parquet")
    assert main(["eval", "report", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert pq.read_table(out / "results.parquet").equals(before)
    assert main(["eval", "report", "--out", str(out / "images")]) == 2  # no run there
    assert "holds no run" in capsys.readouterr().err


@pytest.mark.slow
def test_launched_processes_split_the_cases_and_process_0_reports(synthetic_bench, tiny_zoo, tmp_path):
    """Two processes under torchrun (what `accelerate launch --num_processes 2` sets up too: RANK,
    WORLD_SIZE): each case runs once, on process i mod 2, and process 0 reports after both are done."""
    out = tmp_path / "out"
    with socket.socket() as sock:  # a free port for the processes' rendezvous (0 would not be shared)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "inference.cli", "eval", "run", "--model", str(tiny_zoo / "largen-pipeline"),
           "--bench", str(synthetic_bench), "--out", str(out), "--rows", "largen-b0.3", "--profile", "tiny",
           "--steps", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGEN_TINY_MODELS": str(tiny_zoo)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    cases = load_cases(synthetic_bench)
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["case_id"] for r in results) == sorted(c["case_id"] for c in cases)
    index = {c["case_id"]: i for i, c in enumerate(cases)}
    assert all(r["process"] == index[r["case_id"]] % 2 and r["status"] == "ok" for r in results)
    assert stdout.count("wrote ") == 1  # the report, by process 0 only
