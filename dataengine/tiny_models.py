"""Recipes for the data engine's tiny offline checkpoints (tag, ground, segment, caption).

Each builder writes one complete checkpoint (model + processor, safetensors) with `save_pretrained`
into an existing empty folder, from a small fixed config and a fixed seed, so the loading code in
`dataengine.models` runs unchanged against it. `scripts/make_tiny_models.py` orchestrates them.
Bump `RECIPE_VERSION` whenever a recipe's output changes, so existing zoos are rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

RECIPE_VERSION = "2"

SEED = 0

# Tags every tiny checkpoint knows; "sky" is a non-entity tag so the exclusion list can be tested.
TINY_TAGS = [
    "person", "dog", "cat", "car", "chair", "table", "cup", "bottle", "bicycle", "tree", "flower", "sky",
]  # fmt: skip

# Common caption words, so the tiny captioner's tokenizer encodes real prompts in whole words.
CAPTION_WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "this", "that", "image", "photo",
    "picture", "describe", "briefly", "shows", "there", "sitting", "standing", "next", "to", "near",
    "red", "blue", "green", "white", "black", "small", "large", "wooden", "old", "young", "man",
    "woman", "child", "grass", "road", "room", "street", "water", "what", "object", "it", "its",
    "A", "The", "This", "Describe", "What",
]  # fmt: skip

CLIP_TEXT_MAX_LENGTH = 77


def _char_vocab() -> list[str]:
    """Printable ASCII characters: every caption and tag can be spelled with them."""
    return [chr(c) for c in range(33, 127)]


def _prefix_merges(
    words: list[str], prefix: str = "", suffix: str = ""
) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE merges that assemble each word left to right; returns (new tokens, merges)."""
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for word in words:
        symbols = ([prefix] if prefix else []) + list(word)
        if suffix:
            symbols[-1] = symbols[-1] + suffix
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
                merges.append((current, symbol))
            current = merged
    return tokens, merges


# ---------------------------------------------------------------------------------------------
# tag: CLIP zero-shot over a tag vocabulary
# ---------------------------------------------------------------------------------------------


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _char_vocab()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = sorted({w for tag in TINY_TAGS for w in tag.split()} | {"a", "photo", "of"})
    merged, merges = _prefix_merges(words, suffix="</w>")
    vocab_list = specials + chars + [c + "</w>" for c in chars] + merged
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_TEXT_MAX_LENGTH)


def build_clip_tagger(out: Path) -> None:
    """Tiny CLIP (32 px, patch 8, width 32, 2 layers) + processor + a 12-tag vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": CLIP_TEXT_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "tag_vocabulary.txt").write_text("\n".join(TINY_TAGS) + "\n")


# ---------------------------------------------------------------------------------------------
# ground: Grounding DINO (tiny Swin + tiny BERT)
# ---------------------------------------------------------------------------------------------


def _bert_vocab(words: list[str]) -> dict[str, int]:
    """A WordPiece vocab laid out like bert-base-uncased where Grounding DINO needs it.

    `GroundingDinoModel` hard-codes the ids of [CLS] (101), [SEP] (102), "." (1012) and "?" (1029)
    to split phrases, so those tokens sit at exactly those ids; filler tokens pad the gaps.
    """
    fixed = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
    by_id = {i: t for t, i in fixed.items()}
    extra = [w for w in dict.fromkeys(words + list("abcdefghijklmnopqrstuvwxyz,")) if w not in fixed]
    size = 1030 + len(extra)
    tokens = []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
        elif i >= 1030:
            tokens.append(extra[i - 1030])
        else:
            tokens.append(f"[unused{i}]")
    return {t: i for i, t in enumerate(tokens)}


def build_grounding_dino(out: Path) -> None:
    """Tiny Grounding DINO: Swin (embed 8, 64 px), BERT (width 32), d_model 32, 30 queries."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
    )

    words = sorted({w for tag in TINY_TAGS for w in tag.split()} | {"a", "an", "the", "of"})
    tokenizer = BertTokenizer(vocab=_bert_vocab(words))
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": 64,
            "patch_size": 4,
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 4,
            "out_indices": [2, 3, 4],
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        d_model=32,
        num_queries=30,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_n_points=2,
        decoder_n_points=2,
        # Three levels, the backbone's own: a fourth (a stride-2 conv on the last) is 1 x 1 at 64 px,
        # where its GroupNorm (one channel per group) fails, so square images of the processor's
        # 64 px shortest edge could not be grounded (the real model sees 800 px and has no such edge).
        num_feature_levels=3,
        max_text_len=64,
    )
    torch.manual_seed(SEED)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(out)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# segment: SAM
# ---------------------------------------------------------------------------------------------

SAM_IMAGE_SIZE = 64
SAM_PATCH_SIZE = 8
# The mask decoder upsamples the (image_size / patch_size) embedding grid 4x.
SAM_MASK_SIZE = SAM_IMAGE_SIZE // SAM_PATCH_SIZE * 4


def build_sam(out: Path) -> None:
    """Tiny SAM: ViT (64 px, patch 8, width 32, 2 layers), 32-d prompt encoder and mask decoder."""
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    hidden = 32
    config = SamConfig(
        vision_config={
            "hidden_size": hidden,
            "output_channels": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SAM_IMAGE_SIZE,
            "patch_size": SAM_PATCH_SIZE,
            "window_size": 4,
            "global_attn_indexes": [1],
            "num_pos_feats": hidden // 2,
            "mlp_dim": 64,
        },
        prompt_encoder_config={
            "hidden_size": hidden,
            "image_size": SAM_IMAGE_SIZE,
            "patch_size": SAM_PATCH_SIZE,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": hidden,
        },
    )
    image_processor = SamImageProcessorPil(
        size={"longest_edge": SAM_IMAGE_SIZE},
        pad_size={"height": SAM_IMAGE_SIZE, "width": SAM_IMAGE_SIZE},
        mask_size={"longest_edge": SAM_MASK_SIZE},
        mask_pad_size={"height": SAM_MASK_SIZE, "width": SAM_MASK_SIZE},
    )
    torch.manual_seed(SEED)
    model = SamModel(config).eval()
    model.save_pretrained(out)
    SamProcessor(image_processor=image_processor).save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# caption: LLaVA-1.5 (tiny CLIP vision tower + tiny Llama)
# ---------------------------------------------------------------------------------------------

LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8
# llava-1.5 keeps every patch and drops CLS ("default" strategy): (32 / 8) ** 2 = 16 image tokens.
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2

# The llava-hf/llava-1.5 chat template: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = (
        CAPTION_WORDS
        + [w for tag in TINY_TAGS for w in tag.split()]
        + ["user", "assistant", "USER", "ASSISTANT"]
    )
    merged, merges = _prefix_merges(list(dict.fromkeys(words)), prefix="▁")
    vocab_list = specials + ["▁"] + _char_vocab() + ["\n"] + merged
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,  # like llava-hf/llava-1.5: prompts start with <s>
        add_eos_token=False,
        padding_side="left",
    )


def build_llava(out: Path) -> None:
    """Tiny LLaVA-1.5: CLIP vision (32 px, patch 8, width 32) + Llama (width 32, 2 layers)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llama_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": LLAVA_IMAGE_SIZE,
            "patch_size": LLAVA_PATCH_SIZE,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=image_token_id,
        image_seq_length=LLAVA_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the CLIP vision tower
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# tag: RAM++ (tiny Swin + tiny tagging head), saved in the published checkpoint's layout
# ---------------------------------------------------------------------------------------------

RAM_TINY_FILENAME = "ram_plus_tiny.pth"


def build_ram_plus(out: Path) -> None:
    """Tiny RAM++ over `TINY_TAGS` as a published-layout `.pth` + config.json + tag list + thresholds.

    The thresholds are upstream's for these tags. The classifier's weights are drawn wider than a
    fresh `nn.Linear` so the random model's tag probabilities spread instead of all sitting at 0.5.
    """
    from dataengine.ram.checkpoint import model_to_published, write_config, write_tag_files
    from dataengine.ram.files import BUILTIN_TAG_LIST, BUILTIN_THRESHOLDS, read_tag_list, read_thresholds
    from dataengine.ram.model import RamPlus, RamPlusConfig

    upstream = read_tag_list(BUILTIN_TAG_LIST)
    upstream_thresholds = read_thresholds(BUILTIN_THRESHOLDS, len(upstream), RamPlusConfig.full().threshold)
    by_tag = dict(zip(upstream, upstream_thresholds))
    config = RamPlusConfig.tiny(num_tags=len(TINY_TAGS))
    torch.manual_seed(SEED)
    model = RamPlus(config).eval()
    with torch.no_grad():
        model.label_embed.normal_(0.0, 1.0)
        model.fc.weight.normal_(0.0, 0.5)
    torch.save({"model": model_to_published(model)}, out / RAM_TINY_FILENAME)
    write_config(out, config)
    write_tag_files(out, list(TINY_TAGS), [by_tag[tag] for tag in TINY_TAGS])


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-file progress bars while a builder saves (they swamp the zoo log)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _quietly(build: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        with _quiet_progress():
            build(out)

    run.__name__ = build.__name__
    run.__doc__ = build.__doc__
    return run


BUILDERS: dict[str, Callable[[Path], None]] = {
    "clip-tagger": _quietly(build_clip_tagger),
    "ram-plus": _quietly(build_ram_plus),
    "grounding-dino": _quietly(build_grounding_dino),
    "sam": _quietly(build_sam),
    "llava": _quietly(build_llava),
}
