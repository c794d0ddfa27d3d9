"""Caption stage: a regional caption per instance from LLaVA (paper section 5, Fig. 5).

The instance crop (its box with the subject margin, RGB) goes to LLaVA with the prompt template of
`caption.prompt`, which names the instance's tag; generation is greedy (deterministic) and batched
over the instances of a chunk. Captions that are empty, shorter than `min_words` words, or one word
repeated are dropped and counted (`caption_empty`, `caption_too_short`, `caption_degenerate`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import load_captioner
from dataengine.stages.base import ImageRecord, Stage

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def caption_problem(text: str, min_words: int) -> str | None:
    """Why a generated caption is unusable (a drop reason), or None when it is fine."""
    words = _WORD.findall(text.lower())
    if not words:
        return "caption_empty"
    if len(words) < min_words:
        return "caption_too_short"
    if len(words) >= 4 and len(set(words)) == 1:
        return "caption_degenerate"
    return None


def clean_caption(text: str) -> str:
    """One line, single spaces, no surrounding whitespace."""
    return " ".join(text.split())


class CaptionStage(Stage):
    """Instances → a caption each (instances with unusable captions are dropped)."""

    name = "caption"

    @classmethod
    def resources(cls, cfg: RunConfig) -> Resources:
        return cfg.pipeline.caption.resources

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.ccfg = cfg.pipeline.caption
        self.model, self.processor = load_captioner(cfg.profile.captioner, device=self.device)
        # Batched generation needs the prompt right-aligned, the new tokens after it.
        self.processor.tokenizer.padding_side = "left"

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def prompt(self, tag: str) -> str:
        """The chat-formatted prompt for one instance."""
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.ccfg.prompt.format(tag=tag)}],
            }
        ]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def process(self, records: Sequence[ImageRecord]) -> None:
        jobs = [(record, inst) for record in records for inst in record.instances]
        images = [Image.fromarray(inst.subject[..., :3]) for _, inst in jobs]
        texts = [self.prompt(inst.tag) for _, inst in jobs]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.ccfg.max_new_tokens,
            do_sample=False,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        captions = [clean_caption(t) for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        by_record: dict[int, list[str]] = {}
        for (record, _), caption in zip(jobs, captions):
            by_record.setdefault(id(record), []).append(caption)
        for record in records:
            kept = []
            for inst, caption in zip(record.instances, by_record.get(id(record), [])):
                problem = caption_problem(caption, self.ccfg.min_words)
                if problem is None:
                    inst.caption = caption
                    kept.append(inst)
                else:
                    record.drops[problem] += 1
            record.instances = kept
            record.counts[self.name] = len(kept)
            if not kept:
                record.finish("no_usable_caption", "caption: every caption was empty or degenerate")
