"""Encode stage: turn each surviving instance into a format-v1 WebDataset sample (dataengine.schema).

Runs last, as Ray tasks, so JPEG/PNG encoding is spread over the cluster and the driver only writes
bytes. Sets each image's final status (`ok` or `no_instances`) and drops the pixel arrays, which are
not needed past this point.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from dataengine.config import RunConfig
from dataengine.schema import Quadruplet, SampleMeta, encode_sample, sample_key
from dataengine.stages.base import OK, PENDING, ImageRecord, Stage


def model_ids(cfg: RunConfig) -> dict[str, str]:
    """The checkpoints that made a sample, by role (written into every sample's json)."""
    profile = cfg.profile
    models = {
        "tagger": profile.tagger,
        "grounding": profile.grounding,
        "segmenter": profile.segmenter,
        "captioner": profile.captioner,
    }
    if cfg.pipeline.caption.mode != "global":  # the caption <-> crop agreement filter ran
        models["clip"] = profile.clip
    return models


class EncodeStage(Stage):
    """Instances → encoded samples (`__key__`, source.jpg, mask.png, subject.png, txt, json)."""

    name = "encode"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.models = model_ids(cfg)
        self.config_hash = cfg.config_hash()
        self.jpeg_quality = cfg.pipeline.output.jpeg_quality

    def wants(self, record: ImageRecord) -> bool:
        return True  # every record leaves here with a final status and without pixel arrays

    def process(self, records: Sequence[ImageRecord]) -> None:
        for record in records:
            if record.status == PENDING and record.instances:
                record.samples = self.encode(record)
                record.status = OK
                record.counts[self.name] = len(record.samples)
            elif record.status == PENDING:
                record.finish("no_instances")
            record.image = None
            record.instances = [_light(inst) for inst in record.instances]

    def encode(self, record: ImageRecord) -> list[dict]:
        """The encoded samples of one image, instance numbers 0.. in instance order."""
        source = Image.fromarray(record.image)
        height, width = record.image.shape[:2]
        samples = []
        for number, inst in enumerate(record.instances):
            key = sample_key(record.source_id, number)
            captions = {"regional": inst.caption} if inst.caption else {}
            if record.global_caption:
                captions["global"] = record.global_caption
            meta = SampleMeta(
                source_id=record.source_id,
                instance=number,
                uri=record.uri,
                width=width,
                height=height,
                tag=inst.tag,
                box_xyxy=list(inst.box),
                box_score=inst.box_score,
                text_score=inst.text_score,
                mask_score=inst.mask_score,
                mask_area_frac=round(float(inst.mask.mean()), 6),
                models=self.models,
                pipeline=self.cfg.pipeline_name,
                config_hash=self.config_hash,
                mask_stability=inst.mask_stability,
                clip_score=inst.clip_score,
                captions=captions,
            )
            quad = Quadruplet(
                key=key,
                source=source,
                mask=Image.fromarray(inst.mask.astype("uint8") * 255),
                subject=Image.fromarray(inst.subject),
                text=inst.caption or record.global_caption,  # the regional caption when there is one
                meta=meta,
            )
            samples.append(encode_sample(quad, jpeg_quality=self.jpeg_quality))
        return samples


def _light(inst):
    """The instance without its arrays (what the driver needs for the parquet row)."""
    inst.mask = None
    inst.subject = None
    return inst
