"""Read stage: fetch each input image's bytes, derive its source id, decode it safely.

Runs first, as plain Ray tasks (no model). Every failure here is per image: the image keeps its
parquet row with the reason (`read: empty file (0 bytes)`, `read: image is ... over
limits.max_pixels`, ...) and the shard goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataengine.config import RunConfig
from dataengine.images import ImageDecodeError, decode_image
from dataengine.inputs import read_bytes
from dataengine.schema import source_id_from_bytes
from dataengine.stages.base import ImageRecord, Stage


class ReadStage(Stage):
    """Bytes → `source_id` (SHA-256 of the bytes) and an upright, size-capped RGB array."""

    name = "read"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.limits = cfg.pipeline.limits
        self.max_side = cfg.pipeline.output.max_side

    def process(self, records: Sequence[ImageRecord]) -> None:
        seen: dict[str, str] = {}
        for record in records:
            try:
                data = read_bytes(record.item)
            except (OSError, ValueError) as exc:
                record.fail(self.name, f"cannot read {record.uri}: {type(exc).__name__}: {exc}")
                continue
            record.source_id = source_id_from_bytes(data) if data else ""
            if record.source_id in seen:
                # Same bytes twice in one shard would give the same sample keys twice.
                record.finish("duplicate_source", f"same bytes as {seen[record.source_id]}")
                continue
            try:
                record.image = decode_image(
                    data,
                    max_pixels=self.limits.max_pixels,
                    max_side=self.max_side,
                    min_side=self.limits.min_side,
                    max_bytes=self.limits.max_bytes,
                )
            except ImageDecodeError as exc:
                record.fail(self.name, str(exc))
                continue
            record.size = (int(record.image.shape[0]), int(record.image.shape[1]))
            if record.source_id:
                seen[record.source_id] = record.uri
            record.counts[self.name] = 1
