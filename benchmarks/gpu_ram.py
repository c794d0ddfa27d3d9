"""RAM++ throughput: images/s of the full-size tagger (Swin-L 384, 4,585 tags) at batch 16, one JSON line.

Random weights at the published sizes (no download): the time of a forward pass does not depend on
the values. Measures the model only (pixels already on the device, as the tag stage's batches
are), best of a few timed rounds after warm-up, and the peak GPU memory.

    .venv/bin/python benchmarks/gpu_ram.py                        # CUDA, bf16, batch 16
    .venv/bin/python benchmarks/gpu_ram.py --dtype fp16 --batch 32
    .venv/bin/python benchmarks/gpu_ram.py --device cpu --tiny    # seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.ram.model import RamPlus, RamPlusConfig  # noqa: E402
from dataengine.release_cli import OneLineErrorParser  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="gpu_ram.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny test-size model instead of the full one")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the best counts (default 5)")
    return parser


def measure(model: RamPlus, pixels: torch.Tensor, rounds: int) -> float:
    """Best seconds per forward pass over `rounds`, after two warm-up passes."""
    cuda = pixels.device.type == "cuda"
    best = float("inf")
    with torch.inference_mode():
        for i in range(rounds + 2):
            if cuda:
                torch.cuda.synchronize(pixels.device)
            start = time.perf_counter()
            model(pixels)
            if cuda:
                torch.cuda.synchronize(pixels.device)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error("argument --batch/--rounds: must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"argument --device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine (use --device cpu --tiny)")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = RamPlusConfig.tiny() if args.tiny else RamPlusConfig.full()
    torch.manual_seed(0)
    with torch.device(device):
        model = RamPlus(config)
    with torch.no_grad():
        model.label_embed.normal_()
    model = model.to(dtype).eval()
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = measure(model, pixels, args.rounds)
    report = {
        "benchmark": "ram_plus",
        "model": "tiny" if args.tiny else "ram_plus_swin_large_14m (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "image_size": config.image_size,
        "tags": config.num_tags,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "ms_per_batch": round(seconds * 1000, 2),
        "images_per_s": round(args.batch / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
