"""The rows of the paper's tables and how each one inpaints a case.

Every row takes the same case (scene, box, subject cut, prompt, seed) and returns an RGB image of
the scene's size. LAR-Gen rows call `LARGenPipeline` (zoom-in crop, pasted back with a seam of
`margin` pixels); the diffusers baselines inpaint the whole scene resized so its longer side is the
model's resolution (sides multiples of 8) and are resized back, which is how those pipelines are
used. Each row's generator is seeded with the case's seed on the row's device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from evaluation.metrics import box_mask, on_white

SWEEP_BETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SDIIPA_SCALE = 0.5  # the paper's lambda for SD-inpainting + IP-Adapter ("larger lambda neglects the text")


@dataclass(frozen=True)
class Row:
    """One row of a table: which model, which inputs, which strength."""

    name: str
    label: str  # as the paper's tables write it
    prompts: str  # the paper's "Prompts" column
    model: str  # which loaded model runs it: largen, sd, pbe, sdiipa, locate, assign
    text: bool
    subject: bool
    beta: float | None = None
    refine: bool = True


def _sweep_name(beta: float) -> str:
    return "largen-b0.3" if beta == 0.3 else f"beta-{beta:.1f}"


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("sd-inpainting", "SD-Inpainting", "text&mask", "sd", text=True, subject=False),
        Row("paint-by-example", "Paint-by-Exa", "image&mask", "pbe", text=False, subject=True),
        Row("sdiipa", f"SDIIPA (λ = {SDIIPA_SCALE})", "text&image&mask", "sdiipa", text=True, subject=True),
        Row("largen-b0.3", "LAR-Gen (β = 0.3)", "text&image&mask", "largen", text=True, subject=True, beta=0.3),
        Row("largen-b1.0-notext", "LAR-Gen (β = 1.0, s = ∅)", "image&mask", "largen", text=False, subject=True, beta=1.0),
        Row("largen-text", "LAR-Gen (text only)", "text&mask", "largen", text=True, subject=False),
        Row("locate", "+ Locate mechanism", "text&mask", "locate", text=True, subject=False),
        Row("assign", "++ Assign mechanism", "text&image&mask", "assign", text=True, subject=True, beta=0.3, refine=False),
        *(
            Row(f"beta-{b:.1f}", f"LAR-Gen (β = {b:.1f})", "text&image&mask", "largen", text=True, subject=True, beta=b)
            for b in SWEEP_BETAS
            if b != 0.3
        ),
    )
}
# Fig. 13's points in beta order; 0.3 is Table 1's LAR-Gen row (same model, cases and seeds).
SWEEP_ROWS = tuple(_sweep_name(b) for b in SWEEP_BETAS)
GROUPS = {
    "table1": ("largen-b0.3", "largen-b1.0-notext", "largen-text", "sd-inpainting", "paint-by-example", "sdiipa"),
    "table2": ("sd-inpainting", "locate", "assign", "largen-b0.3"),
    "sweep": SWEEP_ROWS,
}
NOT_RUN = {"anydoor": "AnyDoor has no diffusers implementation; the table lists the paper's figures"}


def resolve_rows(spec: str) -> list[str]:
    """Row names from a comma list of rows and groups (table1, table2, sweep, all), in table order.

    Raises:
        ValueError: an unknown name, or a row that cannot run (AnyDoor).
    """
    wanted: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = [*GROUPS["table1"], *GROUPS["table2"], *GROUPS["sweep"]]
        elif item in GROUPS:
            names = list(GROUPS[item])
        elif item in ROWS:
            names = [item]
        elif item in NOT_RUN:
            raise ValueError(f"--rows {item!r} cannot run: {NOT_RUN[item]}")
        else:
            known = ", ".join([*GROUPS, "all", *ROWS])
            raise ValueError(f"--rows {item!r} is not a row or group; known: {known}")
        wanted += [n for n in dict.fromkeys(names) if n not in wanted]
    if not wanted:
        raise ValueError("--rows names no row")
    return wanted


def fit_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) with the longer side `resolution` and the aspect kept, both multiples of 8 (>= 8)."""
    w, h = size
    scale = resolution / max(w, h)
    return max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8)


def model_resolution(pipe) -> int:
    """The pixel size a diffusers pipeline was trained at: UNet sample size x VAE scale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_paint_by_example(ref: str | os.PathLike, dtype: torch.dtype | None = None):
    """`PaintByExamplePipeline` from its parts (hub id or folder), without the safety checker.

    The published checkpoint's model_index.json names the image encoder's library
    `paint_by_example`, which current diffusers cannot resolve; loading the parts one by one
    sidesteps it and reads the same weights.
    """
    from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import AutoImageProcessor

    kw = {"torch_dtype": dtype} if dtype is not None else {}
    ref = os.fspath(ref)
    return PaintByExamplePipeline(
        vae=AutoencoderKL.from_pretrained(ref, subfolder="vae", **kw),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(ref, subfolder="image_encoder", **kw),
        unet=UNet2DConditionModel.from_pretrained(ref, subfolder="unet", **kw),
        scheduler=PNDMScheduler.from_pretrained(ref, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=AutoImageProcessor.from_pretrained(ref, subfolder="feature_extractor"),
        requires_safety_checker=False,
    )


Generate = Callable[[Row, dict, Image.Image, Image.Image, int], Image.Image]


class Runner:
    """The loaded models of the requested rows; `generate(row, case, scene, subject, margin)` runs one.

    Args:
        models: model family -> loaded pipeline (largen, sd, pbe, sdiipa, locate, assign).
        device: torch device the pipelines are on.
        steps: denoising steps of every row.
        guidance: classifier-free guidance scale w of every row.
    """

    def __init__(self, models: dict, device: str, steps: int, guidance: float) -> None:
        self.models = models
        self.device = device
        self.steps = steps
        self.guidance = guidance
        for pipe in models.values():
            pipe.set_progress_bar_config(disable=True)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def generate(self, row: Row, case: dict, scene: Image.Image, subject: Image.Image, margin: int) -> Image.Image:
        """The row's output for the case: RGB, the scene's size."""
        pipe = self.models[row.model]
        prompt = case["prompt"] if row.text else None
        box = tuple(case["box"])
        if row.model in ("largen", "assign"):
            return pipe(
                scene, box, prompt=prompt, subject_image=subject if row.subject else None, beta=row.beta,
                guidance_scale=self.guidance, num_inference_steps=self.steps, generator=self._generator(case["seed"]),
                use_refine=row.refine, paste_dilation=margin,
            ).images[0]
        size = fit_size(scene.size, model_resolution(pipe))
        image = scene.resize(size, Image.Resampling.LANCZOS)
        mask = box_mask(box, scene.size).resize(size, Image.Resampling.NEAREST)
        common = dict(
            image=image, mask_image=mask, height=size[1], width=size[0], num_inference_steps=self.steps,
            guidance_scale=self.guidance, generator=self._generator(case["seed"]),
        )
        if row.model == "pbe":
            out = pipe(example_image=on_white(subject), **common).images[0]
        elif row.model == "sdiipa":
            out = pipe(prompt=prompt, ip_adapter_image=on_white(subject), **common).images[0]
        else:  # sd, locate: text and mask
            out = pipe(prompt=prompt, **common).images[0]
        return out.convert("RGB").resize(scene.size, Image.Resampling.LANCZOS)


def models_needed(rows: Sequence[str]) -> list[str]:
    """The model families the rows need, in a fixed order."""
    order = ["largen", "assign", "sd", "locate", "pbe", "sdiipa"]
    needed = {ROWS[r].model for r in rows}
    return [m for m in order if m in needed]
