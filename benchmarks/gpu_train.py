"""GPU benchmark: one stage-1 and one stage-2 LAR-Gen training step at full SD-1.5 size (random init, bf16).

    python benchmarks/gpu_train.py [--batch-size 8] [--resolution 512] [--steps 3]
    python benchmarks/gpu_train.py --device cpu --tiny    # tiny sizes on the CPU (the test runs it)

Builds the real architectures from their SD-1.5 / IP-Adapter-Plus configs with random weights
(nothing is downloaded): the 9-channel inpainting UNet, the SD VAE, the CLIP ViT-L/14 text
encoder, the CLIP ViT-H/14 image encoder and the IP-Adapter-Plus resampler; stage 2 adds RefineNet
(a copy of the UNet) and the detail MLP. Each stage runs the trainer's own loss (`compute_loss`:
VAE encode, text encode, subject encode, denoise, MSE) + backward + AdamW under bf16 autocast with
gradient checkpointing, batch 8 at 512², and reports the median step time, samples/s and the peak
GPU memory, with the GPU's name, with and without channels-last weights (`optim.channels_last`).
Prints one JSON line. Needs a CUDA GPU (or `--device cpu --tiny`); budget: about 2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_common import device_info, peak_memory_gib, positive, reset_peak_memory, sync  # noqa: E402

SD15_INPAINT_UNET = {
    "sample_size": 64, "in_channels": 9, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408}
CLIP_H_VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 1024}
# The same architectures, tiny, for the CPU test of this script.
TINY = {
    "unet": {**SD15_INPAINT_UNET, "sample_size": 8, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
             "cross_attention_dim": 32, "attention_head_dim": 2},
    "vae": {**SD15_VAE, "sample_size": 64, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1,
            "norm_num_groups": 16},
    "text": {**CLIP_L_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "projection_dim": 32},
    "vision": {**CLIP_H_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 32},
    "cross": 32, "resampler": {"resampler_dim": 32, "resampler_heads": 2},
}
FULL = {"unet": SD15_INPAINT_UNET, "vae": SD15_VAE, "text": CLIP_L_TEXT, "vision": CLIP_H_VISION, "cross": 768,
        "resampler": {"resampler_dim": 768, "resampler_heads": 12}}


def build_model(device: torch.device, sizes: dict = FULL):
    """The LAR-Gen components with random weights (`FULL`: SD-1.5 / IP-Adapter-Plus sizes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from inference.model import AssignAdapter, LARGenModel, _cross_attention_layers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sizes["unet"])
    layers = _cross_attention_layers(unet)
    adapter = AssignAdapter(
        layers=[n for n, _, _ in layers], key_ids=[k for _, k, _ in layers], hidden_sizes=[h for _, _, h in layers],
        cross_attention_dim=sizes["cross"], image_embed_dim=sizes["vision"]["hidden_size"], **sizes["resampler"],
        num_tokens=16,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**sizes["vision"]))
    model = LARGenModel(unet, adapter, image_encoder).to(device)
    vae = AutoencoderKL(**sizes["vae"]).to(device, torch.bfloat16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**sizes["text"])).to(device, torch.bfloat16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return model, vae, text_encoder, scheduler


def run_stage(stage: int, model, vae, text_encoder, scheduler, batch_size: int, resolution: int, steps: int,
              device: torch.device, channels_last: bool = False) -> dict:
    """Median seconds per optimizer step of one stage (after a warm-up step), samples/s and peak memory."""
    from training.train import ConditionedDenoiser, compute_loss, freeze_for_stage, step_generator

    if stage == 2 and not model.has_refine:
        model.add_refine()
        model.to(device)
    params = [p for _, p in freeze_for_stage(model, stage)]
    model.image_encoder.to(torch.bfloat16)
    model.image_proj.to(torch.bfloat16)
    # As the trainer: stage 2 checkpoints RefineNet only (the injected features live only in forward).
    if stage == 1:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
        model.refinenet.enable_gradient_checkpointing()
        model.refinenet.train()
    model.unet.train()
    # The trainer's own option (`optim.channels_last`); in place, so it stays on for what follows.
    model.optimize(channels_last=channels_last)
    denoiser = ConditionedDenoiser(model, beta=1.0 if stage == 1 else 0.3, use_refine=stage == 2)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    b, r = batch_size, resolution
    clip = model.image_encoder.config.image_size
    batch = {
        "pixel_values": torch.rand(b, 3, r, r) * 2 - 1,
        "mask": (torch.rand(b, 1, r, r) > 0.5).float(),
        "input_ids": torch.randint(0, text_encoder.config.vocab_size - 1, (b, 77)),
        "clip_pixels": torch.randn(b, 3, clip, clip),
        "refine_pixels": torch.rand(b, 3, r, r) * 2 - 1,
        "drop_image": torch.zeros(b, dtype=torch.bool),
    }
    reset_peak_memory(device.type)
    times = []
    for step in range(steps + 1):  # the first step warms up kernels and allocator
        sync(device.type)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compute_loss(denoiser, batch, vae, text_encoder, scheduler, step_generator(0, step, 0, 0, device),
                                0.18215, torch.bfloat16, device, stage)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device.type)
        if step:
            times.append(time.perf_counter() - t0)
    del optimizer
    step_s = statistics.median(times)
    return {"stage": stage, "channels_last": channels_last, "step_s_median": round(step_s, 4),
            "samples_per_s": round(batch_size / step_s, 2), "peak_memory_gib": peak_memory_gib(device.type),
            "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 1), "loss": round(loss.item(), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CPU test)")
    parser.add_argument("--batch-size", type=positive, default=None, help="default 8 (tiny 2)")
    parser.add_argument("--resolution", type=positive, default=None, help="default 512 (tiny 64)")
    parser.add_argument("--steps", type=positive, default=None, help="timed steps per stage after one warm-up "
                        "(default 3; tiny 1)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --tiny)")
    batch_size = args.batch_size or (2 if args.tiny else 8)
    resolution = args.resolution or (64 if args.tiny else 512)
    steps = args.steps or (1 if args.tiny else 3)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny ops: threads only contend
    t0 = time.perf_counter()
    model, vae, text_encoder, scheduler = build_model(device, TINY if args.tiny else FULL)
    report = {"benchmark": "gpu_train", **device_info(args.device), "tiny": args.tiny, "batch_size": batch_size,
              "resolution": resolution, "precision": "bf16 autocast", "gradient_checkpointing": True, "stages": []}
    for stage in (1, 2):
        for channels_last in (False, True):
            report["stages"].append(run_stage(stage, model, vae, text_encoder, scheduler, batch_size, resolution,
                                              steps, device, channels_last))
            print(json.dumps(report["stages"][-1]), file=sys.stderr, flush=True)
        # Stage 2 starts from plain weights again (its RefineNet is new; the main UNet goes back).
        model.unet.to(memory_format=torch.contiguous_format)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
