"""Fixtures for the trainer tests: synthetic format-v1 shards (clean and with corrupt members)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from dataengine.schema import MASK, SOURCE, encode_sample
from training.synthetic import synthetic_quadruplet, write_synthetic_shards


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """Four 64-px shards of 6 samples each (24 samples)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), num_shards=4, samples_per_shard=6, size=64)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_corrupt_shard(path: Path, good: int = 6, size: int = 64) -> dict[str, int]:
    """A shard with `good` good samples, then one JPEG of garbage, one missing its mask, one with an
    all-empty mask, and a last sample cut off inside its final member (a truncated copy).

    Returns:
        The skip counts by reason that reading it must report.
    """
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(good + 4):
            q = synthetic_quadruplet(1000 + i, size)
            if i == good + 2:
                q.mask.paste(0, (0, 0, size, size))
            sample = encode_sample(q)
            key = sample.pop("__key__")
            if i == good:
                sample[SOURCE] = b"not a jpeg at all"
            elif i == good + 1:
                del sample[MASK]
            for field, data in sample.items():
                _add(tar, f"{key}.{field}", data)
    with tarfile.open(tmp) as tar:
        last = tar.getmembers()[-1]
    data = tmp.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size // 2])
    os.remove(tmp)
    # garbage JPEG + missing mask + the cut-off sample (its last member is lost) fail to decode;
    # the truncated stream itself is one unreadable-tar event.
    return {"decode": 3, "empty_mask": 1, "tar": 1}


@pytest.fixture()
def corrupt_shard(tmp_path) -> tuple[str, dict[str, int]]:
    path = tmp_path / "000000.tar"
    expected = write_corrupt_shard(path)
    return str(path), expected


def write_truncated_shard(path: Path, size: int = 64) -> None:
    """A shard cut off inside its first member: a valid tar header, no complete sample."""
    tmp = path.with_suffix(".full")
    sample = encode_sample(synthetic_quadruplet(2000, size))
    key = sample.pop("__key__")
    with tarfile.open(tmp, "w") as tar:
        for field, data in sample.items():
            _add(tar, f"{key}.{field}", data)
    data = tmp.read_bytes()
    path.write_bytes(data[:1000])  # 512-byte header + part of the first member's data
    os.remove(tmp)


def write_undecodable_shard(path: Path, samples: int = 3, size: int = 64) -> None:
    """A well-formed tar whose every sample fails to decode (its source image is garbage)."""
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            sample = encode_sample(synthetic_quadruplet(3000 + i, size))
            key = sample.pop("__key__")
            sample[SOURCE] = b"not a jpeg at all"
            for field, data in sample.items():
                _add(tar, f"{key}.{field}", data)
