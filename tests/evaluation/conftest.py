"""Evaluation tests: torch single-threaded (tiny models on a shared 2-core machine), shared tiny scorer."""

from __future__ import annotations

import pytest

from tests.threads import torch_threads


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="package")
def scorer(tiny_zoo):
    """The metrics' models from the tiny zoo: CLIP (clip-tagger) and DINO (dino-vits16), loaded once."""
    from evaluation.metrics import Scorer

    return Scorer(tiny_zoo / "clip-tagger", tiny_zoo / "dino-vits16")


@pytest.fixture(scope="package")
def synthetic_bench(tmp_path_factory):
    """A 4-case synthetic benchmark (1 scene x 2 subjects x 2 prompts), 64 px."""
    from evaluation.benchmark import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("bench") / "bench", scenes=1, prompts_per_subject=2, size=64)
