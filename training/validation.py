"""Validation during training: inpaint a few held samples in every mode and write a PNG grid (+ tensorboard).

One row per (sample, mode), columns source | mask | subject | output, for the modes text-only,
subject-only and text+subject, all through `LARGenPipeline` with the weights being trained.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.config import TrainConfig
from training.data import caption_of, read_quadruplets

logger = logging.getLogger(__name__)

MODES = ("text", "subject", "text+subject")
CELL = 128


def _cell(image: Image.Image, label: str | None = None) -> Image.Image:
    """Fit an image into a CELL x CELL white square (subjects composited on white), optionally labelled."""
    if image.mode in ("RGBA", "LA"):
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image.convert("RGBA"), (0, 0), image.convert("RGBA").getchannel("A"))
        image = flat
    image = image.convert("RGB")
    image.thumbnail((CELL, CELL), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    cell.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    if label:
        ImageDraw.Draw(cell).text((3, 2), label, fill=(255, 0, 255))
    return cell


def validation_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally many images into one grid of CELL-sized cells."""
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * CELL, len(rows) * CELL), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img, (x * CELL, y * CELL))
    return grid


@torch.no_grad()
def run_validation(cfg: TrainConfig, pipe, device: torch.device) -> Image.Image | None:
    """Inpaint `validation.samples` held quadruplets in the three modes; return the grid (None: no sample)."""
    quads = read_quadruplets(cfg.validation.shards or cfg.data.shards, cfg.validation.samples)
    if not quads:
        logger.warning("validation: no readable sample in %s", cfg.validation.shards or cfg.data.shards)
        return None
    # One bar per denoising call would print len(MODES) x samples bars into the training log.
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for q in quads:
        caption = caption_of(q, cfg.data.caption)  # the caption the run trains on (`data.caption`)
        for mode in MODES:
            generator = torch.Generator(device=device).manual_seed(cfg.validation.seed)
            out = pipe(
                image=q.source, mask_image=q.mask,
                prompt=caption if mode != "subject" else None,
                subject_image=q.subject if mode != "text" else None,
                beta=cfg.model.beta, guidance_scale=cfg.validation.guidance_scale,
                num_inference_steps=cfg.validation.num_inference_steps, generator=generator,
                resolution=cfg.data.resolution,
            ).images[0]
            rows.append([_cell(q.source, caption[:24]), _cell(q.mask), _cell(q.subject), _cell(out, mode)])
    return validation_grid(rows)


def log_validation(cfg: TrainConfig, pipe, accelerator, step: int, out_dir: Path) -> Path | None:
    """Write `out_dir/validation/step-{step:06d}.png` and log it to tensorboard (main process only).

    Returns:
        The PNG path (None on other processes or without samples).
    """
    if not accelerator.is_main_process:
        return None
    model = pipe.model
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with accelerator.autocast():
            grid = run_validation(cfg, pipe, accelerator.device)
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    if grid is None:
        return None
    folder = out_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    tmp = folder / f".step-{step:06d}.png.tmp"
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    try:
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    except (ValueError, AttributeError) as exn:  # no tensorboard tracker initialised
        logger.debug("validation grid not logged to tensorboard: %s", exn)
    return path
