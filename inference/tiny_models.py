"""Recipes for the tiny offline inference checkpoints (SD-1.5 and SDXL inpainting, IP-Adapter-Plus for each).

Each builder writes, into an existing empty folder, a checkpoint laid out exactly like the real
one it stands in for, so `inference.loading` loads both with the same code. Fixed seeds,
safetensors only; `scripts/make_tiny_models.py` orchestrates them. The weights are random: they
test mechanics, never image quality.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

RECIPE_VERSION = "2"

SEED = 0
# Model resolution: UNet sample_size 8 latents x VAE factor 8 = 64 px images.
IMAGE_SIZE = 64

# One UNet config shared by both recipes: the IP-Adapter's to_k_ip/to_v_ip shapes and numbering
# depend on it, and the ip-adapter builder must not depend on the sd-inpainting folder existing.
# Mirrors SD 1.5 (CrossAttn blocks at the high-resolution levels, plain blocks at the lowest),
# so down, mid and up blocks all have self-attention (attn1) and cross-attention (attn2).
UNET_CONFIG: dict = {
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    # SD 1.5 semantics: diffusers reads this legacy field as the number of heads.
    "attention_head_dim": 2,
    "norm_num_groups": 32,
}

VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG: dict = {
    "hidden_size": UNET_CONFIG["cross_attention_dim"],
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}

# SD 1.5 inpainting's scheduler_config.json.
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

IMAGE_ENCODER_IMAGE_SIZE = 32
IMAGE_ENCODER_CONFIG: dict = {
    "image_size": IMAGE_ENCODER_IMAGE_SIZE,
    "patch_size": 8,  # 16 patches + CLS = 17 tokens
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # Plus reads hidden_states[-2], the output of layer 1
    "num_attention_heads": 4,
    "projection_dim": 32,
}

# IP-Adapter-Plus resampler (the original `Resampler`). diffusers' converter hard-codes depth 4,
# dim_head 64 and heads = to_q rows // 64, so the tiny inner dim is one 64-wide head.
RESAMPLER_CONFIG: dict = {
    "dim": 64,
    "depth": 4,
    "dim_head": 64,
    "heads": 1,
    "num_queries": 16,
    "embedding_dim": IMAGE_ENCODER_CONFIG["hidden_size"],
    "output_dim": UNET_CONFIG["cross_attention_dim"],
    "ff_mult": 4,
}

TOKENIZER_WORDS = (
    "a", "photo", "of", "the", "an", "and", "in", "on", "with", "at",
    "dog", "cat", "person", "man", "woman", "car", "chair", "table", "cup", "bottle",
    "red", "green", "blue", "white", "black", "small", "large",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE: the byte alphabet, each byte + `</w>`, merges for a few words, specials."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in TOKENIZER_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _write_tokenizer_files(folder: Path) -> None:
    vocab, merges = _clip_bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(**UNET_CONFIG)


def build_sd_inpainting(out: Path) -> None:
    """SD-1.5-inpainting layout: vae, text_encoder, tokenizer, unet (9 in-channels), scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = _tiny_unet()
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**VAE_CONFIG)

    # Write the BPE files ourselves, then load them through the real tokenizer class.
    tok_src = out / ".tokenizer-src"
    _write_tokenizer_files(tok_src)
    tokenizer = CLIPTokenizer.from_pretrained(tok_src, model_max_length=77)
    vocab, _ = _clip_bpe_vocab()
    torch.manual_seed(SEED + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config).eval()

    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep the plain BPE files next to whatever the tokenizer class serialized.
    _write_tokenizer_files(out / "tokenizer")
    for f in tok_src.iterdir():
        f.unlink()
    tok_src.rmdir()


def _randomize_norms(module: nn.Module) -> None:
    # Default LayerNorms are exactly 1/0; perturb them so a loader that drops them is caught.
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            nn.init.normal_(sub.weight, 1.0, 0.02)
            nn.init.normal_(sub.bias, 0.0, 0.02)


def ip_adapter_state_dict() -> dict[str, torch.Tensor]:
    """The tiny IP-Adapter-Plus weights in the published flat layout (`image_proj.*`, `ip_adapter.*`).

    Built as the model's own `AssignAdapter` and written with its published-layout converter;
    diffusers' independent `load_ip_adapter` reading this file back (tests) checks that layout.
    """
    from inference.model import AssignAdapter

    torch.manual_seed(SEED + 10)
    adapter = AssignAdapter.for_unet(
        _tiny_unet(),
        image_embed_dim=RESAMPLER_CONFIG["embedding_dim"],
        resampler_dim=RESAMPLER_CONFIG["dim"],
        resampler_heads=RESAMPLER_CONFIG["heads"],
        num_tokens=RESAMPLER_CONFIG["num_queries"],
    )
    assert adapter.config.resampler_depth == RESAMPLER_CONFIG["depth"]
    assert adapter.config.resampler_dim_head == RESAMPLER_CONFIG["dim_head"]
    _randomize_norms(adapter)
    return adapter.published_state_dict()


def build_ip_adapter(out: Path) -> None:
    """`h94/IP-Adapter` layout: models/ip-adapter-plus_sd15.safetensors + models/image_encoder/."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    models = out / "models"
    models.mkdir()
    save_file(
        ip_adapter_state_dict(), str(models / "ip-adapter-plus_sd15.safetensors"), metadata={"format": "pt"}
    )

    torch.manual_seed(SEED + 20)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()
    encoder.save_pretrained(models / "image_encoder", safe_serialization=True)
    processor = CLIPImageProcessor(size=IMAGE_ENCODER_IMAGE_SIZE, crop_size=IMAGE_ENCODER_IMAGE_SIZE)
    processor.save_pretrained(models / "image_encoder")


def build_largen_pipeline(out: Path) -> None:
    """A complete LAR-Gen pipeline folder (`LARGenPipeline.from_pretrained`), built from the two bases.

    SD-inpainting + IP-Adapter-Plus (both built here from the recipes above, into a scratch folder)
    go through the real `LARGenPipeline.from_base`, which adds RefineNet (a copy of the UNet) and a
    seeded DetailEncoder, and the DDIM-trailing scheduler; `save_pretrained` writes it to `out`.
    """
    import tempfile

    from inference.pipeline import LARGenPipeline

    with tempfile.TemporaryDirectory(prefix="largen-bases-") as scratch:
        bases = Path(scratch)
        for name, builder in (("sd-inpainting", build_sd_inpainting), ("ip-adapter", build_ip_adapter)):
            (bases / name).mkdir()
            builder(bases / name)
        pipe = LARGenPipeline.from_base(bases / "sd-inpainting", bases / "ip-adapter", seed=SEED + 30)
        pipe.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# SDXL: the same recipes at SDXL's layout (two text encoders, text_time added embedding, 9-channel
# UNet with linear projections and several transformer layers per block), for `inference.sdxl`.
# ---------------------------------------------------------------------------------------------

SDXL_TEXT_DIMS = (32, 32)  # text_encoder, text_encoder_2 hidden sizes: cross-attention dim = their sum
SDXL_POOLED_DIM = 32  # text_encoder_2's projection (the pooled text embedding)
SDXL_TIME_EMBED_DIM = 8  # per added time id (SDXL: 256)

SDXL_UNET_CONFIG: dict = {
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 9,
    "out_channels": 4,
    # SDXL's shape: no attention at the highest resolution, cross-attention below, deeper transformers lower.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": sum(SDXL_TEXT_DIMS),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
    "norm_num_groups": 32,
}

SDXL_VAE_CONFIG: dict = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}

# SDXL's scheduler_config.json (EulerDiscrete there; LAR-Gen swaps in DDIM trailing).
SDXL_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

SDXL_RESAMPLER_CONFIG: dict = {**RESAMPLER_CONFIG, "output_dim": SDXL_UNET_CONFIG["cross_attention_dim"]}


def _tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED + 40)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def build_sdxl_inpainting(out: Path) -> None:
    """`diffusers/stable-diffusion-xl-1.0-inpainting-0.1` layout: vae, text_encoder(_2), tokenizer(_2), unet, scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = _tiny_sdxl_unet()
    torch.manual_seed(SEED + 41)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    tok_src = out / ".tokenizer-src"
    _write_tokenizer_files(tok_src)
    tokenizer = CLIPTokenizer.from_pretrained(tok_src, model_max_length=77)
    # SDXL's second tokenizer pads with "!" instead of <|endoftext|>; the token id differs, the files match.
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_src, model_max_length=77, pad_token="!")
    vocab, _ = _clip_bpe_vocab()
    encoders = []
    for i, (cls, hidden) in enumerate(((CLIPTextModel, SDXL_TEXT_DIMS[0]), (CLIPTextModelWithProjection, SDXL_TEXT_DIMS[1]))):
        tok = (tokenizer, tokenizer_2)[i]
        torch.manual_seed(SEED + 42 + i)
        config = CLIPTextConfig(
            vocab_size=len(vocab), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **{**TEXT_ENCODER_CONFIG, "hidden_size": hidden, "projection_dim": SDXL_POOLED_DIM},
        )
        encoders.append(cls(config).eval())
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        _write_tokenizer_files(out / name)
    for f in tok_src.iterdir():
        f.unlink()
    tok_src.rmdir()


def ip_adapter_sdxl_state_dict() -> dict[str, torch.Tensor]:
    """Tiny IP-Adapter-Plus SDXL weights in the published flat layout, sized for the tiny SDXL UNet."""
    from inference.model import AssignAdapter

    torch.manual_seed(SEED + 50)
    adapter = AssignAdapter.for_unet(
        _tiny_sdxl_unet(),
        image_embed_dim=SDXL_RESAMPLER_CONFIG["embedding_dim"],
        resampler_dim=SDXL_RESAMPLER_CONFIG["dim"],
        resampler_heads=SDXL_RESAMPLER_CONFIG["heads"],
        num_tokens=SDXL_RESAMPLER_CONFIG["num_queries"],
    )
    _randomize_norms(adapter)
    return adapter.published_state_dict()


def build_ip_adapter_sdxl(out: Path) -> None:
    """`h94/IP-Adapter` SDXL layout: sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors + the ViT-H models/image_encoder/."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    (out / "sdxl_models").mkdir()
    save_file(
        ip_adapter_sdxl_state_dict(), str(out / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"),
        metadata={"format": "pt"},
    )
    torch.manual_seed(SEED + 51)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()
    encoder.save_pretrained(out / "models" / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(size=IMAGE_ENCODER_IMAGE_SIZE, crop_size=IMAGE_ENCODER_IMAGE_SIZE).save_pretrained(
        out / "models" / "image_encoder"
    )


def build_largen_xl_pipeline(out: Path) -> None:
    """A complete SDXL LAR-Gen pipeline folder (`LARGenXLPipeline`), from the two tiny SDXL bases via `from_base`."""
    import tempfile

    from inference.sdxl import LARGenXLPipeline

    with tempfile.TemporaryDirectory(prefix="largen-xl-bases-") as scratch:
        bases = Path(scratch)
        for name, builder in (("sdxl-inpainting", build_sdxl_inpainting), ("ip-adapter-sdxl", build_ip_adapter_sdxl)):
            (bases / name).mkdir()
            builder(bases / name)
        pipe = LARGenXLPipeline.from_base(bases / "sdxl-inpainting", bases / "ip-adapter-sdxl", seed=SEED + 60)
        pipe.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd-inpainting": build_sd_inpainting,
    "ip-adapter": build_ip_adapter,
    "largen-pipeline": build_largen_pipeline,
    "sdxl-inpainting": build_sdxl_inpainting,
    "ip-adapter-sdxl": build_ip_adapter_sdxl,
    "largen-xl-pipeline": build_largen_xl_pipeline,
}
