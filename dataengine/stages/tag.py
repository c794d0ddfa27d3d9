"""Tag stage: which object tags an image holds (paper section 5: RAM; here CLIP zero-shot or RAM).

`clip` (default) scores the image against every tag of the profile's vocabulary with CLIP
("a photo of a {tag}"), softmax over the vocabulary, keeps tags at or above `threshold`, drops
non-entity tags (sky, nature, skin, ...: not a box-able instance) and keeps the `top_k` best.
`ram` uses the recognize-anything package when it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import BUILTIN_NON_ENTITY_TAGS, load_tagger, read_tag_vocabulary
from dataengine.stages.base import ImageRecord, Stage


class TagBackendError(RuntimeError):
    """The pipeline asks for a tagging backend that is not installed."""


def non_entity_tags(exclude: list[str] | str) -> set[str]:
    """The exclusion list: `"builtin"` (dataengine/data/non_entity_tags.txt) or an explicit list."""
    if isinstance(exclude, str):
        return set(read_tag_vocabulary(BUILTIN_NON_ENTITY_TAGS))
    return {t.strip().lower() for t in exclude if t.strip()}


class TagStage(Stage):
    """Image → up to `top_k` entity tags with their scores."""

    name = "tag"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.tag.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.tcfg = cfg.pipeline.tag
        self.exclude = non_entity_tags(self.tcfg.exclude)
        if self.tcfg.backend == "ram":
            self.tagger = RamTagger(cfg.profile.tagger, self.device)
            return
        self.tagger = None
        self.vocabulary = read_tag_vocabulary(cfg.profile.tag_vocabulary)
        self.model, self.processor = load_tagger(cfg.profile.tagger, device=self.device)
        prompts = [self.tcfg.prompt.format(tag=t) for t in self.vocabulary]
        with torch.inference_mode():
            text = self.processor(text=prompts, return_tensors="pt", padding=True).to(self.device)
            embeds = self.model.get_text_features(**text).pooler_output
        self.text_embeds = embeds / embeds.norm(dim=-1, keepdim=True)

    def process(self, records: Sequence[ImageRecord]) -> None:
        if self.tagger is not None:
            ranked = [self.tagger(Image.fromarray(r.image)) for r in records]
        else:
            ranked = self._clip_scores(records)
        for record, scores in zip(records, ranked):
            above = [(tag, p) for tag, p in scores if p >= self.tcfg.threshold]
            entities = [(tag, p) for tag, p in above if tag not in self.exclude]
            if len(above) > len(entities):
                record.drops["non_entity_tag"] += len(above) - len(entities)
            record.tags = [tag for tag, _ in entities[: self.tcfg.top_k]]
            record.counts[self.name] = len(record.tags)
            if not record.tags:
                record.finish("no_tags", "tag: no entity tag above tag.threshold")

    def _clip_scores(self, records: Sequence[ImageRecord]) -> list[list[tuple[str, float]]]:
        images = [Image.fromarray(r.image) for r in records]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.model.get_image_features(pixel_values=pixels).pooler_output
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * embeds @ self.text_embeds.T
        probs = logits.softmax(dim=-1).float().cpu()
        out = []
        for row in probs:
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append([(self.vocabulary[i], float(row[i])) for i in order])
        return out


def require_ram() -> None:
    """Check that the recognize-anything package (`tag.backend: ram`) can be imported.

    Raises:
        TagBackendError: it is not installed; the message says how to install it or what to use instead.
    """
    try:
        import ram  # noqa: F401
        import ram.models  # noqa: F401
    except ImportError as exc:
        raise TagBackendError(
            "tag.backend is 'ram' but the recognize-anything package is not installed: "
            "pip install git+https://github.com/xinyu1205/recognize-anything.git, "
            "point profiles.<name>.tagger at the RAM++ checkpoint, or use tag.backend: clip"
        ) from exc


class RamTagger:
    """RAM / RAM++ (recognize-anything): image → its tags, each scored 1.0 (RAM gives no calibrated score).

    Raises:
        TagBackendError: the `ram` package is not installed (only when a pipeline asks for it).
    """

    def __init__(self, checkpoint: str, device: str):
        require_ram()
        from ram import get_transform, inference_ram
        from ram.models import ram_plus

        self.transform = get_transform(image_size=384)
        self.inference = inference_ram
        self.model = ram_plus(pretrained=checkpoint, image_size=384, vit="swin_l").eval().to(device)
        self.device = device

    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        tensor = self.transform(image).unsqueeze(0).to(self.device)
        english, _ = self.inference(tensor, self.model)
        return [(t.strip().lower(), 1.0) for t in english.split("|") if t.strip()]
