"""GPU benchmark: one stage-1 and one stage-2 LAR-Gen training step at full SD-1.5 size (random init, bf16).

    python benchmarks/gpu_train.py [--batch-size 8] [--resolution 512] [--steps 3]

Builds the real architectures from their SD-1.5 / IP-Adapter-Plus configs with random weights
(nothing is downloaded): the 9-channel inpainting UNet, the SD VAE, the CLIP ViT-L/14 text
encoder, the CLIP ViT-H/14 image encoder and the IP-Adapter-Plus resampler; stage 2 adds RefineNet
(a copy of the UNet) and the detail MLP. Each stage runs the trainer's own loss (`compute_loss`:
VAE encode, text encode, subject encode, denoise, MSE) + backward + AdamW under bf16 autocast with
gradient checkpointing, batch 8 at 512², and reports the median step time and the peak GPU
memory, with the GPU's name. Needs a CUDA GPU; budget: well under 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

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


def build_model(device: torch.device):
    """The full-size LAR-Gen components with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from inference.model import AssignAdapter, LARGenModel, _cross_attention_layers

    unet = UNet2DConditionModel(**SD15_INPAINT_UNET)
    layers = _cross_attention_layers(unet)
    adapter = AssignAdapter(
        layers=[n for n, _, _ in layers], key_ids=[k for _, k, _ in layers], hidden_sizes=[h for _, _, h in layers],
        cross_attention_dim=768, image_embed_dim=1280, resampler_dim=768, resampler_heads=12, num_tokens=16,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H_VISION))
    model = LARGenModel(unet, adapter, image_encoder).to(device)
    vae = AutoencoderKL(**SD15_VAE).to(device, torch.bfloat16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(device, torch.bfloat16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return model, vae, text_encoder, scheduler


def run_stage(stage: int, model, vae, text_encoder, scheduler, batch_size: int, resolution: int, steps: int,
              device: torch.device) -> dict:
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
    denoiser = ConditionedDenoiser(model, beta=1.0 if stage == 1 else 0.3, use_refine=stage == 2)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    b, r = batch_size, resolution
    batch = {
        "pixel_values": torch.rand(b, 3, r, r) * 2 - 1,
        "mask": (torch.rand(b, 1, r, r) > 0.5).float(),
        "input_ids": torch.randint(0, 49407, (b, 77)),
        "clip_pixels": torch.randn(b, 3, 224, 224),
        "refine_pixels": torch.rand(b, 3, r, r) * 2 - 1,
        "drop_image": torch.zeros(b, dtype=torch.bool),
    }
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):  # the first step warms up kernels and allocator
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute_loss(denoiser, batch, vae, text_encoder, scheduler, step_generator(0, step, 0, 0, device),
                                0.18215, torch.bfloat16, device, stage)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - t0)
    del optimizer
    return {"stage": stage, "step_s_median": round(statistics.median(times), 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 1), "loss": round(loss.item(), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    model, vae, text_encoder, scheduler = build_model(device)
    report = {"benchmark": "gpu_train", "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "batch_size": args.batch_size, "resolution": args.resolution, "precision": "bf16 autocast",
              "gradient_checkpointing": True, "stages": []}
    for stage in (1, 2):
        report["stages"].append(run_stage(stage, model, vae, text_encoder, scheduler, args.batch_size,
                                          args.resolution, args.steps, device))
        print(json.dumps(report["stages"][-1]), flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_train.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
