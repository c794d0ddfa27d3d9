"""Fixtures for the release tests: two mined folders (tests/release/mined_data.py) and a release of them.

Folder `a` holds two committed shards, an uncommitted one (tar + parquet, no stats marker) and a
half-written one; folder `b` re-mines four source images of `a` (same keys, same bytes) and adds
three new ones.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dataengine.release import build_release
from tests.release.mined_data import expected_keys, mined_shard


@pytest.fixture(scope="session")
def mined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two mined folders (see the module docstring); returns (a, b)."""
    root = tmp_path_factory.mktemp("mined")
    a, b = root / "a", root / "b"
    mined_shard(a, 0, range(0, 6))
    mined_shard(a, 1, range(6, 12))
    mined_shard(a, 2, range(12, 14), commit=False)  # tar + parquet, the stats marker never written
    partial = mined_shard(a, 3, range(14, 15), commit=False)
    partial.write_bytes(partial.read_bytes()[:700])  # a half-written tar of a killed run
    mined_shard(b, 0, [8, 9, 10, 11, 20, 21, 22])
    return a, b


@pytest.fixture(scope="session")
def expected() -> set[str]:
    """The keys a release of both mined folders must hold (committed shards, duplicates once)."""
    return expected_keys([*range(0, 12), 20, 21, 22])


@pytest.fixture(scope="session")
def release_dir(mined: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release of both mined folders: seed 7, a third of the sources in val, 8 samples per shard."""
    out = tmp_path_factory.mktemp("releases") / "v1"
    build_release(mined, out, seed=7, val_fraction=0.3, samples_per_shard=8)
    return out


@pytest.fixture
def release_copy(release_dir: Path, tmp_path: Path) -> Callable[[], Path]:
    """A writable copy of the release, for tests that break it."""

    def copy() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(release_dir, dst)
        return dst

    return copy
