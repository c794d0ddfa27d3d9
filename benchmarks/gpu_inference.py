"""Full-size GPU benchmark: SD-1.5-sized LAR-Gen vs diffusers' inpaint pipeline, fp16, 512x512, 50 steps.

Random weights at the real sizes (SD-1.5 inpainting UNet, SD VAE, CLIP ViT-L text encoder, ViT-H/14
image encoder, IP-Adapter-Plus resampler; RefineNet = a copy of the UNet), so no download is
needed. Reports seconds per image (whole call: encoders, 50 DDIM-trailing steps with CFG, decode,
paste-back) and seconds per step, and peak GPU memory, for: diffusers StableDiffusionInpaintPipeline,
LAR-Gen without Refine, LAR-Gen with Refine; then the same three with channels-last weights, then
also with `torch.compile` of the UNets (and RefineNet; `LARGenPipeline.optimize`), whose first
call (compilation) is timed apart. Then the SDXL rows (`--sdxl`, on by default): diffusers'
StableDiffusionXLInpaintPipeline vs SDXL LAR-Gen (`LARGenXLPipeline`) without and with Refine, at
1024x1024, 50 steps, fp16, random weights at SDXL's real sizes (the 2.6B inpainting UNet from its
config, CLIP ViT-L + OpenCLIP ViT-bigG text encoders, the SDXL VAE in fp16 as the fp16-fix VAE runs,
ViT-H/14 + the IP-Adapter-Plus SDXL resampler), built after the SD-1.5 models are freed. Prints one
JSON line. Runs in a few minutes on one H100-class GPU.

    .venv/bin/python benchmarks/gpu_inference.py [--json gpu.json]
    .venv/bin/python benchmarks/gpu_inference.py --device cpu --tiny   # tiny sizes, CPU (the test runs it)
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
from gpu_common import device_info, peak_memory_gib, positive, reset_peak_memory, sync  # noqa: E402

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


TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
             "cross_attention_dim": 32, "attention_head_dim": 2}
TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 32}
TINY_RESAMPLER = {"resampler_dim": 32, "resampler_heads": 2}

# SDXL 1.0 inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1): its UNet config, 2.6B parameters.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# CLIP ViT-L/14 text (768) and OpenCLIP ViT-bigG/14 text (1280, projection 1280), as SDXL ships them.
SDXL_TEXT = (
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
     "hidden_act": "quick_gelu"},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
     "hidden_act": "gelu", "projection_dim": 1280},
)
SDXL_RESAMPLER = {"resampler_dim": 1280, "resampler_heads": 20}  # ip-adapter-plus_sdxl_vit-h
TINY_SDXL_UNET = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 64, 64), "layers_per_block": 1,
                  "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": 2, "cross_attention_dim": 64,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80}
TINY_SDXL_TEXT = (
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
     "projection_dim": 32},
)


def build_sdxl_pipelines(unet_config: dict, text_configs: tuple[dict, dict], image_encoder: dict, resampler: dict,
                         dtype, device, tokenizer_dirs: tuple[Path, Path]):
    """(diffusers StableDiffusionXLInpaintPipeline, LARGenXLPipeline with Refine) sharing configs; random weights."""
    import copy

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from inference.model import AssignAdapter, LARGenModel
    from inference.pipeline import ddim_trailing
    from inference.sdxl import LARGenXLPipeline
    from inference.tiny_models import SDXL_SCHEDULER_CONFIG, SDXL_VAE_CONFIG

    torch.manual_seed(0)
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs]
    # Built on the target device: initialising 2.6B random parameters twice on a CPU takes minutes.
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        # fp16 throughout, as with the fp16-fix VAE (the stock SDXL VAE would be upcast to fp32 by both pipelines).
        vae_config = dict(SDXL_VAE_CONFIG, sample_size=unet_config["sample_size"] * 8, force_upcast=False)
        if unet_config["block_out_channels"][0] >= 320:
            vae_config.update(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        vae = AutoencoderKL(**vae_config)
        encoders = []
        for cls, config, tok in zip((CLIPTextModel, CLIPTextModelWithProjection), text_configs, tokenizers):
            encoders.append(cls(CLIPTextConfig(
                vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)).eval())
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**image_encoder)).eval()
    scheduler = ddim_trailing(EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).config)
    baseline = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=copy.deepcopy(unet), scheduler=scheduler, requires_aesthetics_score=False,
    )
    with torch.device(device):
        adapter = AssignAdapter.for_unet(unet, image_encoder["hidden_size"], **resampler)
        model = LARGenModel(unet, adapter, encoder)
        model.add_refine()
    size = image_encoder["image_size"]
    largen = LARGenXLPipeline.from_model(
        model, vae, encoders[0], tokenizers[0], copy.deepcopy(scheduler), CLIPImageProcessor(size=size, crop_size=size),
        text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
    )
    for pipe in (baseline, largen):
        pipe.to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    return baseline, largen


def measure(run, repeats: int, device: str) -> dict:
    """Best-of-`repeats` seconds per image and per step (median of a run's steps); peak memory of the runs.

    On a GPU, wall time after a synchronize; on the CPU (`--tiny`), wall time too: only the mechanics
    are checked there.
    """
    reset_peak_memory(device)
    per_image, per_step = [], []
    for _ in range(repeats):
        timer = StepTimer(device)
        timer.clock = time.perf_counter
        sync(device)
        t0 = time.perf_counter()
        run(timer)
        sync(device)
        per_image.append(time.perf_counter() - t0)
        per_step.append(timer.per_step())
    return {"s_per_image": round(min(per_image), 4), "s_per_step": round(min(per_step), 5),
            "peak_memory_gib": peak_memory_gib(device)}


def runners(baseline, largen, resolution: int, device: str, common: dict, **baseline_kwargs):
    """(run_baseline, run_largen(refine)): one call of each pipeline on the same inputs and seed.

    Each run takes a `callback_on_step_end` (how `measure` times the steps); `baseline_kwargs` go to
    diffusers' pipeline only (SDXL inpainting needs strength=1.0 to start from pure noise, as LAR-Gen does).
    """
    image, mask, subject = inputs(resolution)

    def run_baseline(cb):
        baseline(prompt="a dog", image=image, mask_image=mask, height=resolution, width=resolution,
                 generator=torch.Generator(device).manual_seed(0), callback_on_step_end=cb, **baseline_kwargs, **common)

    def run_largen(refine: bool):
        def run(cb):
            largen(image, mask, prompt="a dog", subject_image=subject, use_refine=refine, zoom_in=False,
                   generator=torch.Generator(device).manual_seed(0), callback_on_step_end=cb, **common)
        return run

    return run_baseline, run_largen


def sdxl_rows(args, dtype, steps: int, repeats: int) -> dict[str, dict]:
    """`sdxl_diffusers_inpaint`, `sdxl_largen_refine_off`, `sdxl_largen_refine_on` at SDXL's resolution (1024)."""
    from scripts.make_tiny_models import build_zoo, zoo_dir

    zoo = build_zoo(zoo_dir(), only=["sdxl-inpainting"], quiet=True)  # only for its tokenizer files
    unet, text, vit, resampler = (TINY_SDXL_UNET, TINY_SDXL_TEXT, TINY_VIT, TINY_RESAMPLER) if args.tiny else \
        (SDXL_UNET, SDXL_TEXT, VIT_H14, SDXL_RESAMPLER)
    baseline, largen = build_sdxl_pipelines(unet, text, vit, resampler, dtype, args.device,
                                            (zoo / "sdxl-inpainting" / "tokenizer", zoo / "sdxl-inpainting" / "tokenizer_2"))
    resolution = unet["sample_size"] * 8
    common = dict(num_inference_steps=steps, guidance_scale=7.5)

    run_baseline, run_largen = runners(baseline, largen, resolution, args.device, common, strength=1.0)

    variants = {"sdxl_diffusers_inpaint": run_baseline, "sdxl_largen_refine_off": run_largen(False),
                "sdxl_largen_refine_on": run_largen(True)}
    rows = {}
    with torch.inference_mode():
        for warm in (run_baseline, run_largen(True)):
            warm(lambda *a: {})
        for name, run in variants.items():
            rows[name] = {**measure(run, repeats, args.device), "resolution": resolution}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CPU test)")
    parser.add_argument("--steps", type=positive, default=None, help="denoising steps (default 50; tiny 3)")
    parser.add_argument("--repeats", type=positive, default=None, help="timed runs per variant (default 3; tiny 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the torch.compile variants (default: on a GPU, not with --tiny: compiling "
                        "takes minutes on a CPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; tiny: eager, which only traces)")
    parser.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=True,
                        help="also the SDXL rows: 1024x1024, diffusers SDXL inpaint vs SDXL LAR-Gen (default on)")
    parser.add_argument("--sdxl-only", action="store_true",
                        help="only the SDXL rows (bench_gpu.py runs them as a benchmark of their own, in its own budget)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.sdxl_only and not args.sdxl:
        parser.error("--sdxl-only with --no-sdxl: nothing to run")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --tiny)")
    steps = args.steps or (3 if args.tiny else 50)
    repeats = args.repeats or (1 if args.tiny else 3)
    backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    compile_too = not args.tiny if args.compile is None else args.compile
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny ops: threads only contend

    from scripts.make_tiny_models import build_zoo, zoo_dir

    def report(results: dict) -> dict:
        out = {
            "benchmark": "gpu_inference", **device_info(args.device), "tiny": args.tiny,
            "dtype": str(dtype).split(".")[-1], "resolution": resolution, "steps": steps, "repeats": repeats,
            "compile_backend": backend if compile_too else None,
            "results": results,
            # Each row against diffusers' pipeline of its backbone (the SDXL rows: StableDiffusionXLInpaintPipeline).
            "step_ratio": {k: round(v["s_per_step"] / results["sdxl_diffusers_inpaint" if k.startswith("sdxl_")
                                                             else "diffusers_inpaint"]["s_per_step"], 3)
                           for k, v in results.items()},
        }
        if "diffusers_inpaint_channels_last_compiled" in results:
            cbase = results["diffusers_inpaint_channels_last_compiled"]["s_per_step"]
            out["compiled_step_ratio"] = {k: round(v["s_per_step"] / cbase, 3) for k, v in results.items()
                                          if k.endswith("_compiled")}
        return out

    results: dict[str, dict] = {}
    resolution = None  # the SD-1.5 rows' (each SDXL row records its own)
    if not args.sdxl_only:
        zoo = build_zoo(zoo_dir(), only=["sd-inpainting"], quiet=True)  # only for its tokenizer files
        unet, text_layers, vit, resampler = (TINY_UNET, 1, TINY_VIT, TINY_RESAMPLER) if args.tiny else \
            (SD15_UNET, 12, VIT_H14, PLUS_RESAMPLER)
        baseline, largen = build_pipelines(unet, text_layers, vit, resampler, dtype, args.device,
                                           zoo / "sd-inpainting" / "tokenizer")
        resolution = unet["sample_size"] * 8
        common = dict(num_inference_steps=steps, guidance_scale=7.5)

        run_baseline, run_largen = runners(baseline, largen, resolution, args.device, common)
        variants = {"diffusers_inpaint": run_baseline, "largen_refine_off": run_largen(False),
                    "largen_refine_on": run_largen(True)}
        with torch.inference_mode():
            for warm in (run_baseline, run_largen(True)):  # cuDNN autotune, allocator warm-up
                warm(lambda *a: {})
            for name, run in variants.items():
                results[name] = measure(run, repeats, args.device)
            # In place, so each option adds to the ones before: channels-last, then compiled (+ channels-last).
            for module in (baseline.unet, baseline.vae):
                module.to(memory_format=torch.channels_last)
            largen.optimize(channels_last=True)
            for name, run in variants.items():
                run(lambda *a: {})
                results[f"{name}_channels_last"] = measure(run, repeats, args.device)
            if compile_too:
                # A complete result line before compiling: if compilation overruns the time budget,
                # `bench_gpu.py` keeps this one (the last JSON line printed).
                print(json.dumps(report(results)), flush=True)
                baseline.unet.compile(backend=backend)
                largen.optimize(compile=True, compile_backend=backend)
                for name, run in variants.items():
                    sync(args.device)
                    t0 = time.perf_counter()
                    run(lambda *a: {})  # the first call compiles: timed apart
                    sync(args.device)
                    results[f"{name}_channels_last_compiled"] = {**measure(run, repeats, args.device),
                                                                 "first_call_s": round(time.perf_counter() - t0, 2)}
    if args.sdxl:
        if results:
            print(json.dumps(report(results)), flush=True)  # complete before SDXL, as before compiling
            del baseline, largen, variants
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        results.update(sdxl_rows(args, dtype, steps, repeats))
    out = report(results)
    print(json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
