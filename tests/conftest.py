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
