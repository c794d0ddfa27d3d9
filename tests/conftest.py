"""Shared fixtures: the tiny offline model zoo (built once per machine, reused) and paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny model zoo (`make tiny-models`), built here if a model is missing."""
    from scripts.make_tiny_models import build_zoo, zoo_dir

    return build_zoo(zoo_dir(), quiet=True)


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray (marker `ray`, or the `ray_local` fixture) run in one xdist group.

    `make test` runs two pytest-xdist workers with `--dist loadgroup`: the group keeps those tests
    on one worker, so at most one Ray runs at a time (a `ray start` in the docs needs Ray's default
    ports, which a second Ray would hold). Without xdist the mark does nothing.
    """
    for item in items:
        if item.get_closest_marker("ray") or "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))
