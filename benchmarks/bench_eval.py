"""CPU seconds per case of every evaluation row with the tiny zoo (the harness's own loaders and runner).

Builds the synthetic benchmark in a temporary folder, loads every row's models from the tiny zoo
exactly as `largen eval run --profile tiny` does, and times `Runner.generate` (one case: the whole
pipeline call, zoom-in / resize and paste-back included) and the scoring separately, in this
process's CPU time (`time.process_time`), so other load on a shared machine does not leak into the
figures. Reports the median over the cases, per row, as one JSON line and a Markdown table.

    .venv/bin/python benchmarks/bench_eval.py --threads 1     # ~1-2 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, the protocol's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rows", default="all", help="rows or groups (default all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from evaluation.benchmark import build_synthetic, load_cases
    from evaluation.harness import RunSettings, load_models, resolve_refs
    from evaluation.metrics import seam_margin
    from evaluation.rows import ROWS, Runner, resolve_rows
    from scripts.make_tiny_models import build_zoo, zoo_dir

    zoo = build_zoo(zoo_dir(), quiet=True)
    os.environ.setdefault("LARGEN_TINY_MODELS", str(zoo))
    rows = resolve_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        bench = build_synthetic(Path(tmp) / "bench")
        cases = load_cases(bench)
        refs = resolve_refs("tiny", {"locate_model": str(zoo / "sd-inpainting"), "assign_model": str(zoo / "largen-pipeline")})
        settings = RunSettings(bench=str(bench), out=str(Path(tmp) / "out"), rows=rows, model=str(zoo / "largen-pipeline"),
                               refs=refs, steps=args.steps, guidance=7.5, device="cpu")
        models, scorer = load_models(settings)
        runner = Runner(models, "cpu", args.steps, 7.5)
        scenes = {c["scene_path"]: Image.open(bench / c["scene_path"]).convert("RGB") for c in cases}
        subjects = {c["subject_path"]: Image.open(bench / c["subject_path"]).convert("RGBA") for c in cases}
        per_row, scoring = {}, []
        with torch.inference_mode():
            for name in rows:
                times = []
                for case in cases:
                    scene, subject = scenes[case["scene_path"]], subjects[case["subject_path"]]
                    start = time.process_time()
                    output = runner.generate(ROWS[name], case, scene, subject, seam_margin(scene.size))
                    times.append(time.process_time() - start)
                    start = time.process_time()
                    scorer.score([output], [scene], [case["box"]], [subject], [case["prompt"]], seam_margin(scene.size))
                    scoring.append(time.process_time() - start)
                per_row[name] = round(statistics.median(times), 4)
    out = {
        "benchmark": "bench_eval", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
        "steps": args.steps, "cases": len(cases), "scene": list(next(iter(scenes.values())).size),
        "cpu_s_per_case": per_row, "scoring_cpu_s_per_case": round(statistics.median(scoring), 4),
    }
    print("| row | CPU s / case |\n|---|---|")
    for name, seconds in per_row.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"| (scoring: CLIP-I, CLIP-T, DINO-I, background) | {out['scoring_cpu_s_per_case']:.3f} |")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
