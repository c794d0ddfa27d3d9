"""SDXL LAR-Gen: `LARGenXLPipeline`, the SDXL sibling of `LARGenPipeline`.

Everything but the text and added conditions is `LARGenPipeline`'s (one implementation of Locate,
Assign, Refine, zoom-in, CFG and paste-back). What SDXL adds, through the pipeline's three hooks:

- two text encoders (`CLIPTextModel` + `CLIPTextModelWithProjection`): the cross-attention tokens
  are both penultimate hidden states concatenated (768 + 1280 = 2048 at full size); the pooled
  text embedding is the second encoder's projection;
- added time ids (original size, crop top-left, target size) from the zoom crop's real geometry
  (`sdxl_time_ids`), so the model sees the same micro-conditioning it would for that crop in
  training;
- RefineNet's added conditions use the pooled embedding of the null text (the official release
  conditions its reference branch on the null pooled text, whatever the prompt);
- per-pipeline defaults (`beta_*`, `guidance_rescale`) saved in `model_index.json`, so a
  converted official checkpoint (`inference.official`) runs with the official settings.

The SDXL VAE overflows in float16: when the VAE's config says `force_upcast` (the stock SDXL VAE),
it runs in float32 whatever the pipeline's dtype; the fp16-fix VAE (`force_upcast: false`) stays
in half precision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from inference.loading import (
    ROLE_INPAINT_BASE,
    CheckpointNotFoundError,
    _looks_like_local_path,
    _require_local,
)
from inference.model import AssignAdapter, DetailEncoder, LARGenModel
from inference.pipeline import (
    DEFAULT_BETA,
    MODE_SUBJECT,
    MODE_TEXT,
    MODE_TEXT_SUBJECT,
    LARGenPipeline,
    ddim_trailing,
)

# Where IP-Adapter-Plus SDXL ViT-H lives in `h94/IP-Adapter`: the weights under sdxl_models/, the
# ViT-H image encoder it was trained with under models/ (sdxl_models/image_encoder is bigG).
SDXL_IP_ADAPTER_SUBFOLDER = "sdxl_models"
SDXL_IP_ADAPTER_WEIGHT = "ip-adapter-plus_sdxl_vit-h.safetensors"
SDXL_IMAGE_ENCODER_FOLDER = "models/image_encoder"
SDXL_INPAINT_BASE = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"

PIPELINE_CLASS_NAMES = ("LARGenPipeline", "LARGenXLPipeline")


def sdxl_time_ids(
    crop_box: Sequence[int], source_size: tuple[int, int], resolution: int
) -> tuple[int, int, int, int, int, int]:
    """SDXL's added time ids for a zoom crop: (orig h, orig w, crop top, crop left, target h, target w).

    SDXL's convention, applied to the crop the model sees: the source image (`source_size` = (w, h))
    is scaled by resolution / crop side so that the crop becomes `resolution` pixels; the original
    size is the source's own size, the crop top-left is where the crop starts in the scaled image
    (0 where the crop extends past the image: that part is padding), the target is the square.
    The trainer computes the same ids for its zoom-in crops.

    Raises:
        ValueError: an empty crop box or a non-positive resolution.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    side = max(x1 - x0, y1 - y0)
    if side <= 0 or resolution <= 0:
        raise ValueError(f"sdxl_time_ids: crop box {tuple(crop_box)} or resolution {resolution} is empty")
    scale = resolution / side
    w, h = source_size
    return (int(h), int(w), max(0, round(y0 * scale)), max(0, round(x0 * scale)), int(resolution), int(resolution))


def encode_sdxl_ids(
    text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditions from token ids: (cross-attention tokens [B, L, D1 + D2], pooled [B, P]).

    The tokens are both encoders' penultimate hidden states concatenated, the pooled embedding is
    the second encoder's projection; the pipeline and the trainer both encode through here.
    """
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def load_inpaint_base_xl(ref: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> StableDiffusionXLInpaintPipeline:
    """Load an SDXL-inpainting pipeline (9-channel UNet, two text encoders) by hub id or folder.

    Args:
        ref: e.g. `diffusers/stable-diffusion-xl-1.0-inpainting-0.1`, or a folder written by
            `save_pretrained` in that layout.
        torch_dtype: dtype of the weights; None keeps the stored one.

    Raises:
        CheckpointNotFoundError: the folder or hub id cannot be found or loaded.
        ValueError: the UNet is not a 9-channel inpainting UNet.
    """
    ref_str = os.fspath(ref)
    _require_local(
        ref_str, ROLE_INPAINT_BASE, "model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
        "tokenizer_2",
    )
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(ref_str, **kwargs)
    except OSError as err:
        raise CheckpointNotFoundError(f"{ROLE_INPAINT_BASE}: cannot load {ref_str!r}: {err}") from err
    if pipe.unet.config.in_channels != 9:
        raise ValueError(
            f"{ROLE_INPAINT_BASE}: {ref_str!r} has a {pipe.unet.config.in_channels}-channel UNet; LAR-Gen needs the "
            f"9-channel inpainting UNet ([z; m; z_masked])."
        )
    return pipe


class LARGenXLPipeline(LARGenPipeline):
    r"""LAR-Gen on SDXL: `LARGenPipeline`'s call, with SDXL's text encoders and added conditions.

    Components: those of `LARGenPipeline` plus `text_encoder_2` (`CLIPTextModelWithProjection`) and
    `tokenizer_2`. Saved defaults (in `model_index.json`): `beta_text`, `beta_subject`,
    `beta_text_subject` (the Assign strength per mode when a call passes no `beta`) and
    `guidance_rescale`. The lar-gen defaults are the paper's (`DEFAULT_BETA`, rescale 0); a
    converted official checkpoint stores the official ones (text 0 = no image tokens, subject 1,
    rescale 0.5).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->refinenet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        ip_adapter: AssignAdapter,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        scheduler,
        refinenet: UNet2DConditionModel | None = None,
        detail_encoder: DetailEncoder | None = None,
        beta_text: float = DEFAULT_BETA[MODE_TEXT],
        beta_subject: float = DEFAULT_BETA[MODE_SUBJECT],
        beta_text_subject: float = DEFAULT_BETA[MODE_TEXT_SUBJECT],
        guidance_rescale: float = 0.0,
    ) -> None:
        super().__init__(
            vae, text_encoder, tokenizer, unet, ip_adapter, image_encoder, feature_extractor, scheduler, refinenet,
            detail_encoder,
        )
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(
                "LARGenXLPipeline needs an SDXL UNet (addition_embed_type 'text_time'); "
                "use LARGenPipeline for SD-1.5"
            )
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(
            beta_text=float(beta_text),
            beta_subject=float(beta_subject),
            beta_text_subject=float(beta_text_subject),
            guidance_rescale=float(guidance_rescale),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: LARGenModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler,
        feature_extractor: CLIPImageProcessor | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        **defaults,
    ) -> LARGenXLPipeline:
        """Wrap a `LARGenModel` on an SDXL UNet into a pipeline (shares the modules).

        `defaults`: `beta_text`, `beta_subject`, `beta_text_subject`, `guidance_rescale`.

        Raises:
            ValueError: the second text encoder or tokenizer is missing.
        """
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("LARGenXLPipeline needs text_encoder_2 and tokenizer_2 (SDXL's second text encoder)")
        return super().from_model(model, vae, text_encoder, tokenizer, scheduler, feature_extractor,
                                  text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, **defaults)

    @classmethod
    def from_base(
        cls,
        inpaint: str | os.PathLike = SDXL_INPAINT_BASE,
        image_prompt: str | os.PathLike = "h94/IP-Adapter",
        subfolder: str = SDXL_IP_ADAPTER_SUBFOLDER,
        weight_name: str = SDXL_IP_ADAPTER_WEIGHT,
        image_encoder_folder: str = SDXL_IMAGE_ENCODER_FOLDER,
        with_refine: bool = True,
        torch_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> LARGenXLPipeline:
        """An untrained SDXL LAR-Gen: SDXL-inpainting + IP-Adapter-Plus SDXL ViT-H (+ RefineNet from the UNet).

        Same as `LARGenPipeline.from_base`, with SDXL's defaults: `sdxl_models/ip-adapter-plus_sdxl_vit-h`
        and the ViT-H encoder in `models/image_encoder`.

        Raises:
            CheckpointNotFoundError: a checkpoint cannot be found; ValueError: weights do not fit.
        """
        return super().from_base(
            inpaint, image_prompt, subfolder=subfolder, weight_name=weight_name,
            image_encoder_folder=image_encoder_folder, with_refine=with_refine, torch_dtype=torch_dtype, seed=seed,
        )

    @classmethod
    def _load_inpaint_base(cls, inpaint, torch_dtype):
        return load_inpaint_base_xl(inpaint, torch_dtype=torch_dtype)

    @classmethod
    def _from_base_pipeline(cls, model, base, processor) -> LARGenXLPipeline:
        return cls.from_model(
            model, base.vae, base.text_encoder, base.tokenizer, ddim_trailing(base.scheduler.config), processor,
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        )

    # ------------------------------------------------------------------ the backbone's hooks
    def _encode_text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [
            tokenizer(
                prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for tokenizer in (self.tokenizer, self.tokenizer_2)
        ]
        tokens, pooled = encode_sdxl_ids(self.text_encoder, self.text_encoder_2, *ids)
        dtype = self.unet.dtype
        return tokens.to(dtype), pooled.to(dtype)

    def encode_prompt(self, prompt: str, device: torch.device) -> torch.Tensor:
        """Cross-attention text tokens [1, 77, D1 + D2]: both encoders' penultimate hidden states."""
        return self._encode_text(prompt, device)[0]

    def encode_prompt_pooled(self, prompt: str, device: torch.device) -> torch.Tensor:
        """The pooled text embedding [1, P] of `prompt` (`text_encoder_2`'s projection)."""
        return self._encode_text(prompt, device)[1]

    def _added_conditions(self, pooled, null_pooled, crop_box, source_size, resolution, n, do_cfg, device) -> dict:
        ids = torch.tensor([sdxl_time_ids(crop_box, source_size, resolution)], device=device, dtype=pooled.dtype)
        text_embeds = pooled.repeat(n, 1)
        if do_cfg:
            text_embeds = torch.cat([null_pooled.repeat(n, 1), text_embeds])
        # RefineNet sees the null text's pooled embedding (not the negative prompt's), as the official code.
        empty = self.encode_prompt_pooled("", device)
        return {
            "added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": ids.repeat(text_embeds.shape[0], 1)},
            "refine_added_cond_kwargs": {"text_embeds": empty, "time_ids": ids},
        }

    def default_beta(self, mode: str) -> float:
        """The saved per-mode Assign strength (`beta_text`, `beta_subject`, `beta_text_subject`)."""
        key = {MODE_TEXT: "beta_text", MODE_SUBJECT: "beta_subject", MODE_TEXT_SUBJECT: "beta_text_subject"}[mode]
        return float(self.config.get(key, DEFAULT_BETA[mode]))

    @property
    def default_guidance_rescale(self) -> float:
        """The saved `guidance_rescale` (0.5 for the converted official weights)."""
        return float(self.config.get("guidance_rescale", 0.0))

    def __call__(self, *args, **kwargs):
        """`LARGenPipeline.__call__` (same arguments and output); the VAE runs in float32 when it must.

        The stock SDXL VAE (`force_upcast` in its config) produces NaNs in float16, so it is cast to
        float32 before the call; the fp16-fix VAE keeps its dtype.
        """
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(dtype=torch.float32)
        return super().__call__(*args, **kwargs)


def pipeline_class_name(ref: str | os.PathLike) -> str | None:
    """`_class_name` of the pipeline at `ref` (a folder's model_index.json, or the hub's); None if unreadable."""
    ref_str = os.fspath(ref)
    try:
        if _looks_like_local_path(ref_str):
            config = json.loads((Path(ref_str).expanduser() / "model_index.json").read_text(encoding="utf-8"))
        else:
            config = LARGenPipeline.load_config(ref_str)
    except (OSError, ValueError):
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def load_largen_pipeline(ref: str | os.PathLike, **kwargs) -> LARGenPipeline:
    """Load a LAR-Gen pipeline of either backbone: the class follows the folder's `model_index.json`.

    Args:
        ref: folder or hub id written by `save_pretrained` (SD-1.5 `LARGenPipeline` or SDXL
            `LARGenXLPipeline`).
        kwargs: passed to `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        ValueError: `ref` holds another kind of pipeline; OSError: it cannot be loaded.
    """
    name = pipeline_class_name(ref)
    if name == "LARGenXLPipeline":
        return LARGenXLPipeline.from_pretrained(ref, **kwargs)
    if name in (None, "LARGenPipeline"):
        return LARGenPipeline.from_pretrained(ref, **kwargs)
    raise ValueError(f"{os.fspath(ref)!r} holds a {name}, not a LAR-Gen pipeline ({' or '.join(PIPELINE_CLASS_NAMES)})")
