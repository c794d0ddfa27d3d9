"""The exact-resume check shared by the SD-1.5 and SDXL trainer tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training.train import TRAINABLE_WEIGHTS, train


def assert_resume_is_exact(make_config: Callable[[Path, int], object], tmp_path: Path, trained_prefix: str) -> None:
    """2 steps straight == 1 step, then resumed from its checkpoint to step 2: the same losses and
    trained weights (within 1e-6), which include parameters named `trained_prefix`...

    `make_config(out, steps)` is the run's config, with a checkpoint after every step.
    """
    straight = train(make_config(tmp_path / "a", 2))
    first = train(make_config(tmp_path / "b", 1))
    second = train(make_config(tmp_path / "b", 2), resume_from_checkpoint="latest")
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    a = load_file(str(tmp_path / "a" / "checkpoint-2" / TRAINABLE_WEIGHTS))
    b = load_file(str(tmp_path / "b" / "checkpoint-2" / TRAINABLE_WEIGHTS))
    assert set(a) == set(b) and any(k.startswith(trained_prefix) for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
