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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Make `@pytest.mark.xdist_group` work under `make test`'s `--dist loadgroup` with pytest >= 9.2.

    xdist's loadgroup scheduler reads the group from a `@group` suffix of each test's node id, which
    xdist adds by assigning `item._nodeid`. Since pytest 9.2 the node id is derived from `item._id`
    and that assignment is lost, so every group is silently ignored (tests/test_project.py checks
    the grouping); the suffix is then added here.

    Tests that start an embedded Ray (marker `ray`, or the `ray_local` fixture) share the `ray`
    group: one worker runs them one after the other. Side by side they could (embedded Rays have
    ports of their own, and the docs' `ray start` head gives its dashboard agent one of its own),
    but two Rays on two cores made the suite ~40 s slower (measured: 7m02s against 6m19s).
    """
    loadgroup = bool(getattr(config.option, "loadgroup", False))  # set on xdist workers under --dist loadgroup
    # The slow tests first: xdist hands out work in collection order (groups with the most tests
    # first), so a slow test collected last would run alone at the end while the other worker idles.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        if item.get_closest_marker("ray") or "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))
        group = item.get_closest_marker("xdist_group")
        if loadgroup and group is not None and hasattr(item, "_id") and "@" not in item.nodeid.rsplit("]", 1)[-1]:
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{group.args[0] if group.args else group.kwargs.get('name', 'default')}")
