"""Recipes for the evaluation harness's tiny offline checkpoints (Paint-by-Example, DINO ViT-S/16).

Each builder writes, into an existing empty folder, a checkpoint laid out like the real one it
stands in for (`Fantasy-Studio/Paint-by-Example`, `facebook/dino-vits16`), so the harness loads
both with the same `from_pretrained` code. Fixed seeds, safetensors; the weights are random: they
test mechanics, never image quality. `scripts/make_tiny_models.py` orchestrates them. The CLIP
model of the metrics needs no recipe here: the tiny zoo's `clip-tagger` is a full `CLIPModel`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

RECIPE_VERSION = "1"

SEED = 100
DINO_IMAGE_SIZE = 32


def build_paint_by_example(out: Path) -> None:
    """`PaintByExamplePipeline` layout: vae, image_encoder (CLIP vision + mapper), unet (9 in), scheduler."""
    from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig

    from inference.tiny_models import IMAGE_ENCODER_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(SEED + 2)
    # The mapper has (layers + 1) // 5 blocks: 4 layers give it one, as the real 24-layer encoder has 5.
    vision = CLIPVisionConfig(**{**IMAGE_ENCODER_CONFIG, "num_hidden_layers": 4})
    encoder = PaintByExampleImageEncoder(vision, proj_size=UNET_CONFIG["cross_attention_dim"]).eval()
    size = IMAGE_ENCODER_CONFIG["image_size"]
    pipe = PaintByExamplePipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The hub checkpoint names the encoder's library `paint_by_example` (its module before diffusers
    # moved it under `deprecated`); write the same entry so the loader meets what it meets there.
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_encoder"] = ["paint_by_example", "PaintByExampleImageEncoder"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def build_dino(out: Path) -> None:
    """`facebook/dino-vits16` layout at toy size: a `ViTModel` (no pooler) + its image processor."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(SEED + 10)
    config = ViTConfig(
        image_size=DINO_IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64,
    )
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(out, safe_serialization=True)
    ViTImageProcessorPil(size={"height": DINO_IMAGE_SIZE, "width": DINO_IMAGE_SIZE}).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "paint-by-example": build_paint_by_example,
    "dino-vits16": build_dino,
}
