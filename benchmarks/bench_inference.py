"""Seconds per denoising step: LARGenPipeline (Refine on / off) vs diffusers' StableDiffusionInpaintPipeline.

Both pipelines share one randomly initialised 9-channel UNet config (large enough that the UNet
dominates a step), the same VAE, text encoder, scheduler (DDIM trailing) and classifier-free
guidance (w = 7.5). A step is timed between consecutive `callback_on_step_end` calls (UNet(s),
guidance, scheduler step and, for LAR-Gen, the Eq. 3 blend); reported: the median over the steps
(best of the interleaved runs) and the fastest single step (every step does the same work).

    .venv/bin/python benchmarks/bench_inference.py            # CPU, ~4-6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_inference.py --json out.json

Goal: LAR-Gen / diffusers <= 1.1 without Refine (FLOP bound ~1.0: the decoupled image
cross-attention adds 16 keys), <= 1.6 with Refine (FLOP bound ~1.5: one RefineNet pass on the
un-doubled batch per step serves both CFG halves, plus longer self-attention keys in the decoder;
measured on CPU: RefineNet ~0.5x and the doubled decoder keys ~0.1x of a baseline step, see docs).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Big enough that the UNet dominates on CPU, small enough for minutes: SD-1.5 topology, narrower.
CPU_UNET = {
    "sample_size": 32,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (128, 256, 512),
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}


def build_pipelines(unet_config: dict, text_layers: int, image_encoder: dict, resampler: dict, dtype, device, tokenizer_dir):
    """(diffusers inpaint pipeline, LARGenPipeline) sharing configs; random weights, fixed seeds."""
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from inference.model import AssignAdapter, LARGenModel
    from inference.pipeline import LARGenPipeline, ddim_trailing
    from inference.tiny_models import SCHEDULER_CONFIG, VAE_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    vae_config = dict(VAE_CONFIG, sample_size=unet_config["sample_size"] * 8)
    if unet_config["block_out_channels"][0] >= 320:  # full size: the SD VAE
        vae_config.update(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    vae = AutoencoderKL(**vae_config)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    width = unet_config["cross_attention_dim"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
            num_attention_heads=max(1, width // 64), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**image_encoder)).eval()
    from diffusers import PNDMScheduler

    scheduler = ddim_trailing(PNDMScheduler(**SCHEDULER_CONFIG).config)
    baseline = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=copy.deepcopy(unet), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    adapter = AssignAdapter.for_unet(unet, image_encoder["hidden_size"], **resampler)
    model = LARGenModel(unet, adapter, encoder)
    model.add_refine()
    size = image_encoder["image_size"]
    largen = LARGenPipeline.from_model(
        model, vae, text_encoder, tokenizer, copy.deepcopy(scheduler), CLIPImageProcessor(size=size, crop_size=size)
    )
    for pipe in (baseline, largen):
        pipe.to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    return baseline, largen


def inputs(resolution: int):
    """A random scene, a central mask and an RGBA subject (fixed seed)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
    mask = np.zeros((resolution, resolution), np.uint8)
    q = resolution // 4
    mask[q : 3 * q, q : 3 * q] = 255
    subject = Image.fromarray(rng.integers(0, 256, (resolution // 2, resolution // 3, 4), dtype=np.uint8))
    return image, Image.fromarray(mask), subject


class StepTimer:
    """A `callback_on_step_end` recording the time of each step end.

    On CUDA: wall time after a synchronize. On CPU: this process's CPU time (`time.process_time`),
    so other load on a shared machine does not leak into the figures.
    """

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.marks: list[float] = []
        self.clock = time.perf_counter if self.device.type == "cuda" else time.process_time

    def __call__(self, pipe, step, timestep, kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.marks.append(self.clock())
        return {}

    def per_step(self) -> float:
        diffs = np.diff(self.marks)
        return float(statistics.median(diffs))

    def fastest_step(self) -> float:
        """The shortest step: every step does the same work, and other load only ever adds time."""
        return float(np.diff(self.marks).min())


def time_interleaved(runs: dict, device, repeats: int, fastest: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per step of each `run(callback)`: the runs alternate, and each keeps its best (minimum)
    per-run median, which is robust to other load on a shared machine.

    Args:
        fastest: if given, also filled with each run's fastest single step over all repeats.
    """
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timer = StepTimer(device)
            run(timer)
            best[name] = min(best[name], timer.per_step())
            if fastest is not None:
                fastest[name] = min(fastest.get(name, float("inf")), timer.fastest_step())
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per run (median over steps-1 intervals)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per pipeline (best one kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from scripts.make_tiny_models import build_zoo, zoo_dir

    zoo = build_zoo(zoo_dir(), only=["sd-inpainting"], quiet=True)
    image_encoder = {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 256,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 128}
    resampler = {"resampler_dim": 128, "resampler_heads": 2}
    baseline, largen = build_pipelines(CPU_UNET, 2, image_encoder, resampler, torch.float32, "cpu", zoo / "sd-inpainting" / "tokenizer")
    resolution = CPU_UNET["sample_size"] * 8
    image, mask, subject = inputs(resolution)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5)

    def run_baseline(cb):
        baseline(prompt="a dog", image=image, mask_image=mask, height=resolution, width=resolution,
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, output_type="latent", **common)

    def run_largen(refine: bool):
        def run(cb):
            largen(image, mask, prompt="a dog", subject_image=subject, use_refine=refine, zoom_in=False,
                   generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, output_type="latent", **common)
        return run

    with torch.inference_mode():
        run_baseline(lambda *a: {})  # warm-up
        run_largen(True)(lambda *a: {})
        fastest: dict[str, float] = {}
        times = time_interleaved(
            {"base": run_baseline, "off": run_largen(False), "on": run_largen(True)}, "cpu", args.repeats, fastest
        )
    base, off, on = times["base"], times["off"], times["on"]
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in CPU_UNET.items()},
        "resolution": resolution,
        "steps": args.steps,
        "cpu_s_per_step": {"diffusers_inpaint": base, "largen_refine_off": off, "largen_refine_on": on},
        "ratio": {"refine_off": off / base, "refine_on": on / base},
        # The fastest single step of each pipeline: the least disturbed by other load (a lower bound).
        "cpu_s_fastest_step": {"diffusers_inpaint": fastest["base"], "largen_refine_off": fastest["off"],
                               "largen_refine_on": fastest["on"]},
        "ratio_fastest_step": {"refine_off": fastest["off"] / fastest["base"], "refine_on": fastest["on"] / fastest["base"]},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
