"""`largen serve` under load: 16 concurrent clients on loopback against the tiny pipeline.

Starts `largen serve` as a child process (torch single-threaded, as the direct calls here), then:
1. overhead: one client, one request at a time, vs the same pipeline call made directly in this
   process (same image, box, prompt, steps, seed): median latency of each, and the difference;
   plus the round trip of `GET /healthz` (HTTP on loopback with no work: the floor);
2. load: `--clients` threads share `--requests` requests (each client sends its next request as
   soon as the last one is answered); p50 / p95 / p99 latency, requests/s, failures (any
   non-200 answer or connection error counts);
3. memory: the server's resident set size (VmRSS) after warm-up and after every 100 requests.

    .venv/bin/python benchmarks/bench_serve.py --clients 16 --requests 600   # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)[1]) / 1024


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_server(model: str, steps: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--model", model, "--port", "0", "--steps", str(steps),
         "--max-queue", str(max_queue)],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr:
        found = re.search(r"http://(\S+?)/ ", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, f"http://{found[1]}"
    raise RuntimeError(f"largen serve exited with status {proc.wait()} before serving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(os.environ.get("LARGEN_TINY_MODELS", REPO / ".cache/tiny-models"))
                                                   / "largen-pipeline"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="source image side in pixels")
    parser.add_argument("--overhead-runs", type=int, default=60)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from inference.pipeline import LARGenPipeline

    torch.set_num_threads(1)
    image = Image.fromarray((np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    box = (args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4)
    form = {"box": ",".join(map(str, box)), "prompt": "a red armchair", "steps": str(args.steps), "seed": "0"}

    proc, url = start_server(args.model, args.steps, max_queue=args.clients + 4)
    try:
        post = lambda session: session.post(f"{url}/v1/inpaint", files={"image": ("a.png", png, "image/png")},  # noqa: E731
                                            data=form, timeout=120)
        with requests.Session() as s:
            for _ in range(5):
                post(s).raise_for_status()
        rss = [(0, rss_mib(proc.pid))]

        # 1. overhead: alternate direct and served calls so machine noise hits both alike.
        pipe = LARGenPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        direct, served, floor = [], [], []
        with requests.Session() as s:
            for _ in range(args.overhead_runs):
                t = time.perf_counter()
                s.get(f"{url}/healthz", timeout=30).raise_for_status()
                floor.append(time.perf_counter() - t)
                t = time.perf_counter()
                pipe(image, box, prompt=form["prompt"], num_inference_steps=args.steps,
                     generator=torch.Generator().manual_seed(0))
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                post(s).raise_for_status()
                served.append(time.perf_counter() - t)
        del pipe

        # 2. load
        latencies: list[float] = []
        failures: list[str] = []
        counter = iter(range(args.requests))
        lock = threading.Lock()
        done = [0]

        def client() -> None:
            with requests.Session() as s:
                while True:
                    with lock:
                        if next(counter, None) is None:
                            return
                    t = time.perf_counter()
                    try:
                        r = post(s)
                        ok = r.status_code == 200 and r.headers.get("content-type") == "image/png"
                        if not ok:
                            failures.append(f"{r.status_code}: {r.text[:100]}")
                    except requests.RequestException as err:
                        failures.append(repr(err))
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        done[0] += 1
                        if done[0] % 100 == 0:
                            rss.append((done[0], rss_mib(proc.pid)))

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    d, s_ = statistics.median(direct), statistics.median(served)
    # On a shared machine the medians drift between runs; the pairs alternate, so the median of the
    # per-pair differences and the best of each are the steadier overhead figures.
    paired = statistics.median(b - a for a, b in zip(direct, served))
    result = {
        "clients": args.clients, "requests": args.requests, "steps": args.steps, "size": args.size,
        "load_average": os.getloadavg(),
        "direct_median_s": round(d, 4), "served_median_s": round(s_, 4),
        "overhead_s": round(s_ - d, 4), "overhead_pct": round(100 * (s_ - d) / d, 1),
        "paired_overhead_s": round(paired, 4), "paired_overhead_pct": round(100 * paired / d, 1),
        "direct_best_s": round(min(direct), 4), "served_best_s": round(min(served), 4),
        "best_overhead_pct": round(100 * (min(served) - min(direct)) / min(direct), 1),
        "healthz_round_trip_s": round(statistics.median(floor), 4),
        "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
        "p99_s": round(percentile(latencies, 99), 3), "requests_per_s": round(len(latencies) / wall, 2),
        "failed": len(failures), "answered": len(latencies),
        "rss_mib": [(n, round(m, 1)) for n, m in rss],
        "torch_threads": 1, "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if failures:
        print("first failures:", failures[:3], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
