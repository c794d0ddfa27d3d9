"""Caption stage: a regional caption per instance from LLaVA (paper section 5, Fig. 5).

The instance crop (its box with the subject margin, RGB) goes to LLaVA with the prompt template of
`caption.prompt`, which names the instance's tag; generation is greedy (deterministic) and batched
over the instances of a chunk. Captions that are empty, shorter than `min_words` words, or one word
repeated are dropped and counted (`caption_empty`, `caption_too_short`, `caption_degenerate`).

`caption.mode` picks what is captioned: `regional` (above, the paper's data), `global` (the whole
image with `caption.global_prompt`, once per image: the paper's Table 2 baseline, where the text
describes the scene rather than the object), or `both` (both, in the same batched generate call,
so one mining run serves both training variants). An unusable global caption drops every instance
of its image, counted under the caption's reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from dataengine.config import Resources, RunConfig
from dataengine.models import load_captioner
from dataengine.stages.base import ImageRecord, Instance, Stage, to_model

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
        self.model, self.processor = load_captioner(cfg.profile.captioner, device=self.device, dtype=self.dtype)
        # Batched generation needs the prompt right-aligned, the new tokens after it.
        self.processor.tokenizer.padding_side = "left"

    def wants(self, record: ImageRecord) -> bool:
        return super().wants(record) and bool(record.instances)

    def prompt(self, tag: str) -> str:
        """The chat-formatted prompt for one instance."""
        return self.chat(self.ccfg.prompt.format(tag=tag))

    def chat(self, text: str) -> str:
        """`text` as a chat-formatted user turn about one image, ready for generation."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def process(self, records: Sequence[ImageRecord]) -> None:
        mode = self.ccfg.mode
        # One generate call for the chunk: instance crops (regional) and whole images (global).
        jobs: list[tuple[ImageRecord, Instance | None]] = []
        images: list[Image.Image] = []
        texts: list[str] = []
        for record in records:
            if mode in ("global", "both"):
                jobs.append((record, None))
                images.append(Image.fromarray(record.image))
                texts.append(self.chat(self.ccfg.global_prompt))
            if mode in ("regional", "both"):
                for inst in record.instances:
                    jobs.append((record, inst))
                    images.append(Image.fromarray(inst.subject[..., :3]))
                    texts.append(self.prompt(inst.tag))
        captions = self.generate(images, texts)
        regional: dict[int, str] = {}
        global_captions: dict[int, str] = {}
        for (record, inst), caption in zip(jobs, captions):
            if inst is None:
                global_captions[id(record)] = caption
            else:
                regional[id(inst)] = caption
        for record in records:
            if id(record) in global_captions:
                problem = caption_problem(global_captions[id(record)], self.ccfg.min_words)
                if problem is not None:
                    record.drops[problem] += len(record.instances)
                    record.counts[self.name] = 0
                    record.finish("no_usable_caption", f"caption: the global caption is unusable ({problem})")
                    continue
                record.global_caption = global_captions[id(record)]
            kept = []
            for inst in record.instances:
                caption = regional.get(id(inst))
                problem = None if caption is None else caption_problem(caption, self.ccfg.min_words)
                if problem is None:
                    inst.caption = caption or ""
                    kept.append(inst)
                else:
                    record.drops[problem] += 1
            record.instances = kept
            record.counts[self.name] = len(kept)
            if not kept:
                record.finish("no_usable_caption", "caption: every caption was empty or degenerate")

    def generate(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[str]:
        """Greedy LLaVA captions, one per (image, chat prompt) pair, cleaned to one line."""
        inputs = to_model(self.processor(images=images, text=texts, return_tensors="pt", padding=True), self.device, self.dtype)
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.ccfg.max_new_tokens,
            do_sample=False,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return [clean_caption(t) for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
