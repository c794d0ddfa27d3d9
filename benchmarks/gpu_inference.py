"""Full-size GPU benchmark: SD-1.5-sized LAR-Gen vs diffusers' inpaint pipeline, fp16, 512x512, 50 steps.

Random weights at the real sizes (SD-1.5 inpainting UNet, SD VAE, CLIP ViT-L text encoder, ViT-H/14
image encoder, IP-Adapter-Plus resampler; RefineNet = a copy of the UNet), so no download is
needed. Reports seconds per image (whole call: encoders, 50 DDIM-trailing steps with CFG, decode,
paste-back) and seconds per step, and peak GPU memory, for: diffusers StableDiffusionInpaintPipeline,
LAR-Gen without Refine, LAR-Gen with Refine. Runs in well under 8 minutes on one H100-class GPU.

    .venv/bin/python benchmarks/gpu_inference.py --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import StepTimer, build_pipelines, inputs  # noqa: E402

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VIT_H14 = {"image_size": 224, "patch_size": 14, "hidden_size": 1280, "intermediate_size": 5120,
           "num_hidden_layers": 32, "num_attention_heads": 16, "projection_dim": 1024}
PLUS_RESAMPLER = {"resampler_dim": 768, "resampler_heads": 12}


def measure(run, repeats: int) -> dict:
    """Best-of-`repeats` seconds per image and median seconds per step; peak memory of the runs."""
    torch.cuda.reset_peak_memory_stats()
    per_image, per_step = [], []
    for _ in range(repeats):
        timer = StepTimer("cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(timer)
        torch.cuda.synchronize()
        per_image.append(time.perf_counter() - t0)
        per_step.append(timer.per_step())
    return {
        "s_per_image": min(per_image),
        "s_per_step": min(per_step),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_inference.py needs a CUDA GPU", file=sys.stderr)
        return 1

    from scripts.make_tiny_models import build_zoo, zoo_dir

    zoo = build_zoo(zoo_dir(), only=["sd-inpainting"], quiet=True)  # only for its tokenizer files
    baseline, largen = build_pipelines(
        SD15_UNET, 12, VIT_H14, PLUS_RESAMPLER, torch.float16, "cuda", zoo / "sd-inpainting" / "tokenizer"
    )
    image, mask, subject = inputs(512)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5)

    def run_baseline(cb):
        baseline(prompt="a dog", image=image, mask_image=mask, height=512, width=512,
                 generator=torch.Generator("cuda").manual_seed(0), callback_on_step_end=cb, **common)

    def run_largen(refine: bool):
        def run(cb):
            largen(image, mask, prompt="a dog", subject_image=subject, use_refine=refine, zoom_in=False,
                   generator=torch.Generator("cuda").manual_seed(0), callback_on_step_end=cb, **common)
        return run

    with torch.inference_mode():
        for warm in (run_baseline, run_largen(True)):  # cuDNN autotune, allocator warm-up
            warm(lambda *a: {})
        results = {
            "diffusers_inpaint": measure(run_baseline, args.repeats),
            "largen_refine_off": measure(run_largen(False), args.repeats),
            "largen_refine_on": measure(run_largen(True), args.repeats),
        }
    base = results["diffusers_inpaint"]["s_per_step"]
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "float16",
        "resolution": 512,
        "steps": args.steps,
        "results": results,
        "step_ratio": {k: v["s_per_step"] / base for k, v in results.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
