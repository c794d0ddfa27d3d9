"""GPU benchmark of the data engine's models at full size (random weights), in the fused layout.

    python benchmarks/gpu_engine.py                      # one CUDA GPU, bf16
    python benchmarks/gpu_engine.py --device cpu --tiny  # the same code at tiny sizes (the test runs this)

The fused layout puts every model on one GPU in one process (`engine.layout: fused`), so a
GPU's throughput is one image through all stages after another. This builds the `full` profile's
architectures from their published configs with random weights (nothing is downloaded): a CLIP
ViT-L/14 zero-shot tagger (the `tag.backend: clip` tagger; RAM++ has its own benchmark,
benchmarks/gpu_ram.py), Grounding DINO with the Swin-B backbone, SAM ViT-H and LLaVA-1.5-7B,
each in bf16 on the GPU. It then runs the model calls the stages make, on a chunk of
`--batch` images at a time, as the stages batch them:

- tag: CLIP image features of the chunk against the vocabulary's text features (computed once);
- ground: one Grounding DINO forward for the chunk (800 x 1066 px, a 20-token tag prompt);
- segment: SAM's image embedding once per image (the chunk in one batch), then the mask decoder
  for all of an image's boxes in one call;
- caption: one batched greedy `generate` with the KV cache for every instance crop of the chunk
  (336 px, 576 image tokens), exactly `--tokens` new tokens each (random weights would stop at a
  random EOS; real captions are shorter than the 40-token default, so this is an upper bound).

Reports images/s of the model work (pre- and post-processing on the CPU are not included: they
overlap with the GPU in the engine's Ray pipeline) and each stage's share of the time, with the
GPU's name, peak memory and versions; prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_common import device_info, peak_memory_gib, positive, reset_peak_memory, sync  # noqa: E402

# Published sizes (the `full` profile) and tiny stand-ins of the same architectures.
SIZES = {
    "full": {
        "clip_text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        "clip_vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                            image_size=224, patch_size=14),
        "clip_projection": 768,
        "swin": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384),
        "dino": dict(d_model=256, encoder_layers=6, decoder_layers=6, num_queries=900),
        "dino_text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        "dino_image": (800, 1066),
        "sam_vision": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                           global_attn_indexes=[7, 15, 23, 31], image_size=1024),
        "llava_vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                             image_size=336, patch_size=14),
        "llama": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32064, max_position_embeddings=4096),
        "vocabulary": 4585,  # RAM++'s tag list; the clip backend's builtin list is of that order
    },
    # Tiny: the offline zoo's configs of the same classes (`make tiny-models`), its folders below.
    "tiny": {"zoo": {"tag": "clip-tagger", "ground": "grounding-dino", "segment": "sam", "caption": "llava"},
             "dino_image": (64, 80), "vocabulary": 64},
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (a 7B model built in float32 first would need twice the memory)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_models(size: dict, device: str, dtype: torch.dtype) -> dict:
    """The four engine models with random weights, in eval mode on `device`."""
    from transformers import (
        BertConfig,
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SamConfig,
        SamModel,
        SamVisionConfig,
        SwinConfig,
    )
    torch.manual_seed(0)
    classes = {"tag": CLIPModel, "ground": GroundingDinoForObjectDetection, "segment": SamModel,
               "caption": LlavaForConditionalGeneration}
    if "zoo" in size:
        from transformers import AutoConfig

        from scripts.make_tiny_models import build_zoo, zoo_dir

        zoo = build_zoo(zoo_dir(), quiet=True)
        configs = {name: (classes[name], AutoConfig.from_pretrained(zoo / folder))
                   for name, folder in size["zoo"].items()}
        return _instantiate(configs, device, dtype)
    llama = LlamaConfig(**size["llama"])
    configs = {
        "tag": (CLIPModel, CLIPConfig(text_config=size["clip_text"], vision_config=size["clip_vision"],
                                      projection_dim=size["clip_projection"])),
        "ground": (GroundingDinoForObjectDetection, GroundingDinoConfig(
            backbone_config=SwinConfig(**size["swin"], out_features=["stage2", "stage3", "stage4"]),
            text_config=BertConfig(**size["dino_text"]), **size["dino"])),
        "segment": (SamModel, SamConfig(vision_config=SamVisionConfig(**size["sam_vision"]))),
        "caption": (LlavaForConditionalGeneration, LlavaConfig(
            vision_config=CLIPVisionConfig(**size["llava_vision"]), text_config=llama, image_token_index=32000,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=(size["llava_vision"]["image_size"] // size["llava_vision"]["patch_size"]) ** 2)),
    }
    return _instantiate(configs, device, dtype)


def _instantiate(configs: dict, device: str, dtype: torch.dtype) -> dict:
    models = {}
    for name, (cls, config) in configs.items():
        with default_dtype(dtype), torch.device(device):
            models[name] = cls(config).eval()
    return models


def run_chunk(models: dict, size: dict, images: int, instances: int, boxes: int, tokens: int, device: str,
              dtype: torch.dtype, text_features: torch.Tensor) -> dict[str, float]:
    """Seconds per stage for one chunk of `images` images, as the stages batch their model calls."""
    times: dict[str, float] = {}
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def timed(name, fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = time.perf_counter() - t0
        return out

    clip = models["tag"]
    side = clip.config.vision_config.image_size
    timed("tag", lambda: (clip.get_image_features(pixel_values=rand(images, 3, side, side)).pooler_output @ text_features.T)
          .softmax(-1))
    dino = models["ground"]
    h, w = size["dino_image"]
    ids = torch.randint(1, dino.config.text_config.vocab_size - 1, (images, 20), generator=gen, device=device)
    timed("ground", lambda: dino(pixel_values=rand(images, 3, h, w), input_ids=ids,
                                  attention_mask=torch.ones_like(ids), pixel_mask=torch.ones(images, h, w,
                                                                                               dtype=torch.long,
                                                                                               device=device)))
    sam = models["segment"]
    sam_side = sam.config.vision_config.image_size

    def segment():
        embeddings = sam.get_image_embeddings(rand(images, 3, sam_side, sam_side))
        box = torch.tensor([[[4.0, 4.0, sam_side / 2, sam_side / 2]] * boxes], device=device)
        return [sam(image_embeddings=embeddings[i : i + 1], input_boxes=box, multimask_output=False).pred_masks
                for i in range(images)]

    timed("segment", segment)
    llava = models["caption"]
    crops = images * instances
    vision = llava.config.vision_config
    image_tokens = llava.config.image_seq_length
    words = min(llava.config.text_config.vocab_size, llava.config.image_token_index)  # ids below the image token
    prompt = torch.randint(3, words, (crops, 24), generator=gen, device=device)
    input_ids = torch.cat([prompt[:, :4], torch.full((crops, image_tokens), llava.config.image_token_index,
                                                       device=device), prompt[:, 4:]], dim=1)
    timed("caption", lambda: llava.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        pixel_values=rand(crops, 3, vision.image_size, vision.image_size), max_new_tokens=tokens,
        min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CPU test)")
    parser.add_argument("--images", type=positive, default=None, help="images timed (default 32; tiny 2)")
    parser.add_argument("--batch", type=positive, default=None, help="images per chunk (default 8, the engine's)")
    parser.add_argument("--instances", type=positive, default=3, help="instances captioned per image (default 3)")
    parser.add_argument("--boxes", type=positive, default=5, help="SAM boxes per image (default 5)")
    parser.add_argument("--tokens", type=positive, default=None, help="new tokens per caption (default 40; tiny 4)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --tiny)")
    size = SIZES["tiny" if args.tiny else "full"]
    images = args.images or (2 if args.tiny else 32)
    batch = min(args.batch or (2 if args.tiny else 8), images)
    tokens = args.tokens or (4 if args.tiny else 40)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # tiny ops: threads only contend
    t0 = time.perf_counter()
    models = build_models(size, args.device, dtype)
    build_s = time.perf_counter() - t0
    with torch.inference_mode():
        clip = models["tag"]
        vocab = torch.randint(1, clip.config.text_config.vocab_size - 1, (size["vocabulary"], 8), device=args.device)
        text_features = torch.cat([clip.get_text_features(input_ids=chunk).pooler_output for chunk in vocab.split(512)])
        run_chunk(models, size, batch, args.instances, args.boxes, tokens, args.device, dtype, text_features)  # warm-up
        reset_peak_memory(args.device)
        totals: dict[str, float] = {}
        done = 0
        while done < images:
            n = min(batch, images - done)
            for name, seconds in run_chunk(models, size, n, args.instances, args.boxes, tokens, args.device, dtype,
                                           text_features).items():
                totals[name] = totals.get(name, 0.0) + seconds
            done += n
    total = sum(totals.values())
    result = {
        "benchmark": "gpu_engine", **device_info(args.device), "tiny": args.tiny, "dtype": str(dtype).split(".")[-1],
        "layout": "fused", "images": images, "batch": batch, "instances_per_image": args.instances,
        "boxes_per_image": args.boxes, "caption_tokens": tokens,
        "images_per_s_per_gpu": round(images / total, 3),
        "stage_s_per_image": {k: round(v / images, 4) for k, v in totals.items()},
        "stage_share": {k: round(v / total, 3) for k, v in totals.items()},
        "build_s": round(build_s, 1),
        "peak_memory_gib": peak_memory_gib(args.device),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
