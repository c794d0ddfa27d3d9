"""Seconds per case of each evaluation row at full size on one GPU (random weights at the real sizes).

The rows of Table 1 (and Table 2's Assign = LAR-Gen without Refine) run through the harness's own
`Runner.generate` on one COCO-sized case (640x480 scene, a 200x160 box, an RGBA subject), so the
figures include what a real run does per case: zoom-in crop and paste-back for LAR-Gen, resize to
512 px and back for the baselines, classifier-free guidance (w = 7.5), 50 steps. The models are
SD-1.5-sized with random weights (9-channel UNet, SD VAE, CLIP ViT-L text encoder, IP-Adapter-Plus
with a ViT-H/14 image encoder, RefineNet; Paint-by-Example with its ViT-L/14 encoder), fp16; the
scoring (CLIP ViT-B/32 + DINO ViT-S/16) is timed on its own. Prints one JSON line.

    .venv/bin/python benchmarks/gpu_eval.py                      # one CUDA GPU, a few minutes
    .venv/bin/python benchmarks/gpu_eval.py --device cpu --tiny  # the same code on the tiny configs, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import build_pipelines  # noqa: E402
from gpu_inference import PLUS_RESAMPLER, SD15_UNET, VIT_H14  # noqa: E402

ROWS = ("sd-inpainting", "paint-by-example", "sdiipa", "largen-b0.3", "largen-b1.0-notext", "largen-text", "assign")
VIT_L14 = {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
           "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 768}
DINO_VITS16 = {"image_size": 224, "patch_size": 16, "hidden_size": 384, "intermediate_size": 1536,
               "num_hidden_layers": 12, "num_attention_heads": 6}


def _case(tiny: bool):
    rng = np.random.default_rng(0)
    w, h = (96, 72) if tiny else (640, 480)
    scene = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    box = [w * 0.3, h * 0.3, w * 0.3 + w * 0.3125, h * 0.3 + h / 3]
    subject = Image.fromarray(rng.integers(0, 256, (h // 2, w // 3, 4), dtype=np.uint8), "RGBA")
    return {"case_id": "timing", "prompt": "a dog wearing a top hat", "box": box, "seed": 0}, scene, subject


def _paint_by_example(unet_config, vision, vae, device, dtype):
    from diffusers import PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from inference.tiny_models import SCHEDULER_CONFIG

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**unet_config)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(**vision), proj_size=unet_config["cross_attention_dim"])
    size = vision["image_size"]
    pipe = PaintByExamplePipeline(
        vae=copy.deepcopy(vae), image_encoder=encoder.eval(), unet=unet, scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=CLIPImageProcessor(size=size, crop_size=size), requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def _sdiipa(baseline, largen, image_encoder, device, dtype):
    """SD-inpainting + IP-Adapter-Plus through diffusers' own loader, from LAR-Gen's adapter weights."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    from evaluation.rows import SDIIPA_SCALE
    from inference.loading import load_image_prompt

    pipe = copy.copy(baseline)
    pipe.register_modules(unet=copy.deepcopy(baseline.unet), image_encoder=largen.model.image_encoder,
                          feature_extractor=CLIPImageProcessor(size=image_encoder["image_size"],
                                                               crop_size=image_encoder["image_size"]))
    state = {k: v.float().cpu().contiguous() for k, v in largen.model.ip_adapter.published_state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="gpu-eval-ip-") as tmp:
        (Path(tmp) / "models").mkdir()
        save_file(state, str(Path(tmp) / "models" / "ip-adapter-plus_sd15.safetensors"))
        load_image_prompt(pipe, tmp)
    pipe.set_ip_adapter_scale(SDIIPA_SCALE)
    return pipe.to(device=device, dtype=dtype)


def _scorer(tiny: bool, zoo: Path, device, dtype):
    from transformers import (
        AutoProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from evaluation.metrics import Scorer

    if tiny:
        return Scorer(zoo / "clip-tagger", zoo / "dino-vits16", device)
    processor = AutoProcessor.from_pretrained(zoo / "clip-tagger")  # its tokenizer; a ViT-B/32 image processor below
    processor.image_processor = CLIPImageProcessor(size=224, crop_size=224)
    torch.manual_seed(2)
    clip = CLIPModel(CLIPConfig(text_config={"vocab_size": len(processor.tokenizer)})).to(dtype=dtype)
    dino = ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=False).to(dtype=dtype)
    return Scorer.from_parts(clip, processor, dino, ViTImageProcessor(size={"height": 224, "width": 224}), device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny zoo's configs instead of the real sizes")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --tiny 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed cases per row, the fastest is kept (default 2)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_eval.py: error: --device cuda but CUDA is not available (use --device cpu --tiny)", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.tiny else 50)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32

    from evaluation.metrics import seam_margin
    from evaluation.rows import ROWS as ROW_SPECS
    from evaluation.rows import Runner
    from inference.tiny_models import IMAGE_ENCODER_CONFIG, RESAMPLER_CONFIG, UNET_CONFIG
    from scripts.make_tiny_models import build_zoo, zoo_dir

    zoo = build_zoo(zoo_dir(), only=["sd-inpainting", "clip-tagger", "dino-vits16"], quiet=True)
    if args.tiny:
        unet, text_layers, encoder = UNET_CONFIG, 2, IMAGE_ENCODER_CONFIG
        resampler = {"resampler_dim": RESAMPLER_CONFIG["dim"], "resampler_heads": RESAMPLER_CONFIG["heads"]}
        pbe_vision = {**IMAGE_ENCODER_CONFIG, "num_hidden_layers": 4}
    else:
        unet, text_layers, encoder, resampler, pbe_vision = SD15_UNET, 12, VIT_H14, PLUS_RESAMPLER, VIT_L14
    t0 = time.perf_counter()
    baseline, largen = build_pipelines(unet, text_layers, encoder, resampler, dtype, args.device, zoo / "sd-inpainting" / "tokenizer")
    models = {"sd": baseline, "largen": largen, "assign": largen}
    if "sdiipa" in rows:
        models["sdiipa"] = _sdiipa(baseline, largen, encoder, args.device, dtype)
    if "paint-by-example" in rows:
        models["pbe"] = _paint_by_example(unet, pbe_vision, baseline.vae, args.device, dtype)
    scorer = _scorer(args.tiny, zoo, args.device, dtype)
    build_s = time.perf_counter() - t0
    runner = Runner(models, args.device, steps, 7.5)
    case, scene, subject = _case(args.tiny)
    margin = seam_margin(scene.size)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results = {}
    with torch.inference_mode():
        for name in rows:
            times = []
            for _ in range(args.repeats + 1):  # the first run warms up (cuDNN autotune, allocator)
                _sync(args.device)
                start = time.perf_counter()
                output = runner.generate(ROW_SPECS[name], case, scene, subject, margin)
                _sync(args.device)
                times.append(time.perf_counter() - start)
            results[name] = round(min(times[1:]), 4)
        score_times = []
        for _ in range(args.repeats + 1):
            _sync(args.device)
            start = time.perf_counter()
            scorer.score([output], [scene], [case["box"]], [subject], [case["prompt"]], margin)
            _sync(args.device)
            score_times.append(time.perf_counter() - start)
    out = {
        "benchmark": "gpu_eval",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "sizes": "tiny" if args.tiny else "sd15",
        "scene": list(scene.size),
        "steps": steps,
        "s_per_case": results,
        "scoring_s_per_case": round(min(score_times[1:]), 4),
        "build_s": round(build_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
