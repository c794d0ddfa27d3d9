"""Helpers for the release tests that damage files on purpose: tar members in and out, bad images."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dataengine.release import tar_info, write_sums

Members = list[tuple[str, bytes]]


def read_members(path: Path) -> Members:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]  # type: ignore[union-attr]


def write_members(path: Path, members: Members, fmt: int = tarfile.USTAR_FORMAT) -> None:
    """Write (name, bytes) members as a tar with the release's fixed headers."""
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            tf.addfile(tar_info(name, len(data)), io.BytesIO(data))


def rewrite(root: Path, tar: str, edit: Callable[[Members], Members], resum: bool = True) -> None:
    """Rewrite one tar of a release through `edit`; re-sum so only the intended damage shows."""
    write_members(root / tar, edit(read_members(root / tar)))
    if resum:
        write_sums(root)


def first_key(members: Members) -> str:
    """The key of a tar's first sample."""
    return members[0][0].split(".", 1)[0]


def replace_field(members: Members, key: str, field: str, data: bytes) -> Members:
    """`members` with the bytes of `{key}.{field}` replaced."""
    return [(n, data if n == f"{key}.{field}" else d) for n, d in members]


def field_of(members: Members, key: str, field: str) -> bytes:
    """The bytes of `{key}.{field}`."""
    return next(d for n, d in members if n == f"{key}.{field}")


def png_bytes(img: Image.Image) -> bytes:
    """An image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few-byte PNG whose header claims `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
