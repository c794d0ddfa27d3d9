"""Helpers of the `make bench-gpu` scripts (benchmarks/gpu_*.py): device facts, synchronisation, argument types."""

from __future__ import annotations

import platform

import torch


def device_info(device: str) -> dict:
    """GPU name (or the CPU's), torch / CUDA / cuDNN versions: what every result file records."""
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def sync(device: str) -> None:
    """Wait for the device's queued work (timings on a GPU are meaningless without it)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def peak_memory_gib(device: str) -> float | None:
    """Peak allocated GPU memory since the last reset, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, 2) if device.startswith("cuda") \
        else None


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into `prog: error: ...`, exit 2)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value
