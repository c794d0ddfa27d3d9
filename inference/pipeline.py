"""`LARGenPipeline`: promptable inpainting (text, subject image, or both) as a diffusers pipeline.

One set of weights serves the three modes of the paper; the mode follows the inputs. The
pipeline crops a square around the mask (zoom-in, paper 6.2), denoises with the LAR-Gen model
(`inference.model.LARGenModel`: Locate + Assign + Refine), re-blends the background at every step
(Eq. 3), applies classifier-free guidance with the null text and THE null image (Eq. 12), and
pastes the result back so that every pixel outside the dilated mask is the input's.

Unconditional branch: null text ("" tokens) + `LARGenModel.null_image_embeds`, but the *same*
RefineNet features as the conditional branch (as the official release does). RefineNet therefore
runs once per step for both halves, and guidance pushes along the text/image prompt only; see
docs/inference.md for why.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from inference.loading import (
    DEFAULT_IMAGE_ENCODER_FOLDER,
    DEFAULT_IP_ADAPTER_SUBFOLDER,
    DEFAULT_IP_ADAPTER_WEIGHT,
    _image_encoder_subfolder,
    load_image_encoder,
    load_inpaint_base,
    load_ip_adapter_state_dict,
)
from inference.model import AssignAdapter, DetailEncoder, LARGenModel, plain_attention
from inference.subject import chw_uint8, pixels_to_unit_range, prepare_subject
from inference.zoom import DEFAULT_EXPANSION, crop_resize, crop_with_padding, mask_box, paste_back, zoom_box

MODE_TEXT = "text"
MODE_SUBJECT = "subject"
MODE_TEXT_SUBJECT = "text+subject"

# beta per mode when the caller passes none (paper Table 1): 1.0 for a subject with no text (its
# last row), 0.3 with text, the value stage 2 is trained at. Text-only keeps 0.3 too: its image
# branch still attends to the null image, and 0.3 is the strength stage 2 trained that with.
DEFAULT_BETA = {MODE_TEXT: 0.3, MODE_SUBJECT: 1.0, MODE_TEXT_SUBJECT: 0.3}
# The range the trainer accepts for beta (training/config.py); outside it the model was never run.
BETA_MIN, BETA_MAX = 0.0, 2.0


@dataclass
class LARGenPipelineOutput(BaseOutput):
    """Output of `LARGenPipeline`.

    Attributes:
        images: list of PIL images at the input size, or a float array [N, H, W, 3] in [0, 1]
            (`output_type="np"`), or the final latents of the crop (`output_type="latent"`).
        mode: "text", "subject" or "text+subject".
        crop_box: the square (x0, y0, x1, y1) that was inpainted (may extend past the image).
        beta: the Assign strength the call used (the mode's `DEFAULT_BETA` when none was given).
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    mode: str
    crop_box: tuple[int, int, int, int]
    beta: float


def ddim_trailing(config) -> DDIMScheduler:
    """The official sampler: DDIM with "trailing" timestep spacing, from any SD scheduler config."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def box_to_mask(box: Sequence[float], size: tuple[int, int]) -> Image.Image:
    """A 0/255 L mask of `size` (w, h) with the rectangle `box` (x0, y0, x1, y1; x1, y1 exclusive) set.

    Raises:
        ValueError: not four numbers, or an empty / out-of-image box.
    """
    if len(box) != 4:
        raise ValueError(f"a mask box is (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    w, h = size
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"mask box {tuple(box)} is empty or outside the {w}x{h} image")
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def _check_real(name: str, value) -> None:
    """Raise unless `value` is a finite real number (NaN slips through every `<` comparison)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _as_rgb(image, name: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{name} as an array must be uint8 [H, W, 3|4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL image or a uint8 array, got {type(image).__name__}")
    return image.convert("RGB")


def _as_mask(mask_image, size: tuple[int, int]) -> Image.Image:
    if isinstance(mask_image, tuple | list):
        return box_to_mask(mask_image, size)
    if isinstance(mask_image, np.ndarray):
        arr = mask_image
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        mask_image = Image.fromarray(arr.astype(np.uint8) if arr.ndim == 2 else arr)
    if not isinstance(mask_image, Image.Image):
        raise TypeError(f"mask_image must be a PIL image, an array or a box (x0, y0, x1, y1), got {type(mask_image).__name__}")
    if mask_image.size != size:
        raise ValueError(
            f"mask_image is {mask_image.size[0]}x{mask_image.size[1]} but image is {size[0]}x{size[1]}; they must match"
        )
    return mask_image.convert("L").point(lambda v: 255 if v >= 128 else 0)


class LARGenPipeline(DiffusionPipeline):
    r"""LAR-Gen promptable inpainting: text-only, subject-only or text+subject, from the same weights.

    Components: `vae`, `text_encoder`, `tokenizer`, `unet` (9-channel, saved as a plain
    `UNet2DConditionModel`), `ip_adapter` (`AssignAdapter`: IP-Adapter-Plus resampler +
    `to_k_ip`/`to_v_ip`, saved in the published layout), `image_encoder`, `feature_extractor`,
    `scheduler`, and optionally `refinenet` + `detail_encoder` (Refine). `pipe.model` is the
    `LARGenModel` over these modules (what the trainer trains).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->refinenet->unet->vae"
    _optional_components = ["refinenet", "detail_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "image_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        ip_adapter: AssignAdapter,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        scheduler,
        refinenet: UNet2DConditionModel | None = None,
        detail_encoder: DetailEncoder | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            ip_adapter=ip_adapter,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            scheduler=scheduler,
            refinenet=refinenet,
            detail_encoder=detail_encoder,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.model = LARGenModel(unet, ip_adapter, image_encoder, refinenet, detail_encoder)

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_model(
        cls,
        model: LARGenModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler,
        feature_extractor: CLIPImageProcessor | None = None,
        **components,
    ) -> LARGenPipeline:
        """Wrap a (trained) `LARGenModel` into a pipeline, e.g. to `save_pretrained` it (shares the modules).

        `components`: further arguments of the pipeline class (the SDXL sibling's second text encoder).
        """
        if feature_extractor is None:
            size = model.image_encoder.config.image_size
            feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
        pipe = cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=model.unet,
            ip_adapter=model.ip_adapter,
            image_encoder=model.image_encoder,
            feature_extractor=feature_extractor,
            scheduler=scheduler,
            refinenet=model.refinenet,
            detail_encoder=model.detail_encoder,
            **components,
        )
        pipe.model = model
        return pipe

    @classmethod
    def from_base(
        cls,
        inpaint: str | os.PathLike,
        image_prompt: str | os.PathLike,
        subfolder: str = DEFAULT_IP_ADAPTER_SUBFOLDER,
        weight_name: str = DEFAULT_IP_ADAPTER_WEIGHT,
        image_encoder_folder: str = DEFAULT_IMAGE_ENCODER_FOLDER,
        with_refine: bool = True,
        torch_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> LARGenPipeline:
        """An untrained LAR-Gen from its bases: SD-inpainting + IP-Adapter-Plus (+ RefineNet copied from the UNet).

        The starting point of training, and how the tiny zoo's `largen-pipeline` is made.

        Args:
            inpaint: SD-1.5-inpainting hub id or folder.
            image_prompt: IP-Adapter repo (`h94/IP-Adapter`) or a folder in its layout.
            subfolder, weight_name, image_encoder_folder: where the Plus weights and encoder are.
            with_refine: also create RefineNet (copy of the UNet) and a new DetailEncoder (seeded).
            torch_dtype: dtype for every component; None keeps float32.
            seed: seed of the new DetailEncoder.

        Raises:
            CheckpointNotFoundError: a checkpoint cannot be found; ValueError: weights do not fit.
        """
        base = cls._load_inpaint_base(inpaint, torch_dtype)
        state = load_ip_adapter_state_dict(image_prompt, subfolder, weight_name)
        encoder, processor = load_image_encoder(image_prompt, _image_encoder_subfolder(subfolder, image_encoder_folder))
        if torch_dtype is not None:
            encoder = encoder.to(torch_dtype)
        model = LARGenModel(base.unet, AssignAdapter.from_published(state, base.unet), encoder.eval())
        if with_refine:
            model.add_refine(seed=seed)
        return cls._from_base_pipeline(model, base, processor)

    @classmethod
    def _load_inpaint_base(cls, inpaint: str | os.PathLike, torch_dtype: torch.dtype | None):
        return load_inpaint_base(inpaint, torch_dtype=torch_dtype)

    @classmethod
    def _from_base_pipeline(cls, model: LARGenModel, base, processor: CLIPImageProcessor) -> LARGenPipeline:
        return cls.from_model(
            model, base.vae, base.text_encoder, base.tokenizer, ddim_trailing(base.scheduler.config), processor
        )

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """Save every component (safetensors), the `unet` folder as a plain `UNet2DConditionModel`.

        Written to a temporary folder and renamed into place, so `save_directory` never holds a
        half-written pipeline.

        Raises:
            ValueError: `safe_serialization=False` (pickled checkpoints are not written).
        """
        if not safe_serialization:
            raise ValueError("LARGenPipeline writes safetensors only")
        final = Path(save_directory)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with ExitStack() as stack:
            # The IP-Adapter processors live in the UNet at run time; the ip_adapter component saves them.
            stack.enter_context(plain_attention(self.unet))
            if self.refinenet is not None:
                stack.enter_context(plain_attention(self.refinenet))
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ encoding helpers
    def encode_prompt(self, prompt: str, device: torch.device) -> torch.Tensor:
        """Text encoder hidden states [1, 77, D] for `prompt` ("" is the null text)."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.text_encoder(ids)[0].to(self.unet.dtype)

    # The three hooks below are where a backbone's text / added-condition handling differs; Locate,
    # Assign, Refine, zoom-in and the sampling loop are this class's for every backbone (SDXL:
    # `inference.sdxl.LARGenXLPipeline`).
    def _encode_text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cross-attention text tokens [1, 77, D], pooled text embedding or None) for `prompt`."""
        return self.encode_prompt(prompt, device), None

    def _added_conditions(self, pooled, null_pooled, crop_box, source_size, resolution, n, do_cfg, device) -> dict:
        """Extra keyword arguments of `LARGenModel.forward` for this backbone (none for SD-1.5)."""
        return {}

    def default_beta(self, mode: str) -> float:
        """The Assign strength of a call that passes no `beta` (paper Table 1: `DEFAULT_BETA`)."""
        return DEFAULT_BETA[mode]

    @property
    def default_guidance_rescale(self) -> float:
        """The `guidance_rescale` of a call that passes none (0: off)."""
        return 0.0

    def _encode_vae(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        # The mode, not a sample: the conditions are deterministic given the inputs.
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    @property
    def resolution(self) -> int:
        """The model's native square resolution in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def optimize(self, dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False,
                 compile_mode: str | None = None, compile_backend: str = "inductor") -> LARGenPipeline:
        """Speed options (`largen inpaint --dtype/--channels-last/--compile`); `make bench-gpu` measures each.

        Args:
            dtype: cast every component, e.g. torch.float16 or torch.bfloat16 on a GPU (None: keep).
            channels_last: channels-last convolution weights in the UNet, RefineNet and the VAE.
            compile: `torch.compile` the UNet and RefineNet in place (`LARGenModel.optimize`).
            compile_mode, compile_backend: `torch.compile`'s `mode` and `backend`.

        Returns:
            self, for chaining after `from_pretrained(...).to(device)`.
        """
        if dtype is not None and dtype != self.unet.dtype:
            from diffusers.utils import logging as diffusers_logging

            # diffusers warns on every cast that no module "should be kept in float32" (an empty list).
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                self.to(dtype=dtype)
            finally:
                diffusers_logging.set_verbosity(verbosity)
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.model.optimize(channels_last=channels_last, compile=compile, compile_mode=compile_mode,
                            compile_backend=compile_backend)
        return self

    # ------------------------------------------------------------------ call
    def check_inputs(
        self, prompt, subject_image, beta, guidance_scale, num_inference_steps, resolution, tensor_inputs, output_type
    ) -> str:
        """Validate the call and return the mode. Raises ValueError (TypeError for a wrong type) with what is wrong."""
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        has_text = prompt is not None and prompt.strip() != ""
        if not has_text and subject_image is None:
            raise ValueError("nothing to inpaint with: give a prompt, a subject_image, or both")
        if beta is not None:
            _check_real("beta", beta)
            if not BETA_MIN <= beta <= BETA_MAX:
                raise ValueError(f"beta must be in [{BETA_MIN:g}, {BETA_MAX:g}], got {beta}")
        _check_real("guidance_scale", guidance_scale)
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool):
            raise TypeError(f"num_inference_steps must be an integer, got {type(num_inference_steps).__name__}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        train_steps = self.scheduler.config.get("num_train_timesteps")
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(
                f"num_inference_steps must be <= {train_steps} (the scheduler's training timesteps), got {num_inference_steps}"
            )
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution must be a multiple of {self.vae_scale_factor}, got {resolution}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")
        if has_text and subject_image is not None:
            return MODE_TEXT_SUBJECT
        return MODE_TEXT if has_text else MODE_SUBJECT

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | np.ndarray,
        mask_image: Image.Image | np.ndarray | Sequence[float],
        prompt: str | None = None,
        subject_image=None,
        beta: float | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        zoom_in: bool = True,
        zoom_expansion: float = DEFAULT_EXPANSION,
        negative_prompt: str | None = None,
        use_refine: bool = True,
        guidance_rescale: float | None = None,
        num_images_per_prompt: int = 1,
        resolution: int | None = None,
        paste_dilation: int | None = None,
        paste_feather: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> LARGenPipelineOutput | tuple:
        r"""Inpaint the masked region of `image` guided by `prompt`, `subject_image`, or both.

        Args:
            image: the source image, any size and aspect ratio.
            mask_image: white = inpaint; a mask of the image's size, or a box (x0, y0, x1, y1).
            prompt: text prompt; None/"" for subject-only.
            subject_image: RGBA image, (image, mask) pair, or RGB image; None for text-only.
            beta: Assign strength (Eq. 7), in [0, 2]; 0 turns the image-prompt cross-attention off.
                None: the mode's default (`DEFAULT_BETA`, paper Table 1): 1.0 subject-only, 0.3 with a prompt.
            guidance_scale: w of Eq. 12; <= 1 disables classifier-free guidance.
            num_inference_steps: denoising steps of the scheduler (DDIM trailing by default).
            generator: torch generator; the same seed gives the same image.
            zoom_in: crop a square around the mask box (True), or inpaint the whole image padded to a square.
            zoom_expansion: crop side / longer side of the mask box.
            negative_prompt: replaces the null text in the unconditional branch (the image stays null).
            use_refine: use RefineNet when the pipeline has one and a subject is given.
            guidance_rescale: rescale of the guided noise (0 = off; the official release uses 0.5).
                None: the pipeline's default (`default_guidance_rescale`: 0 here, the converted
                official SDXL weights' 0.5 there).
            num_images_per_prompt: images per call.
            resolution: side of the square the model works at; default the UNet's native size.
            paste_dilation, paste_feather: paste-back mask growth and soft-edge radius in pixels
                (defaults scale with the crop: 2% of its side, half of that).
            output_type: "pil", "np" or "latent".
            return_dict: return a `LARGenPipelineOutput` (else a tuple `(images,)`).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`, as in diffusers.
            callback_on_step_end_tensor_inputs: tensors passed in `callback_kwargs`.

        Returns:
            `LARGenPipelineOutput` with `.images`.

        Raises:
            ValueError / TypeError: bad inputs (no prompt and no subject, mask size, empty mask, ...).
        """
        # 1. Check inputs
        resolution = resolution or self.resolution
        mode = self.check_inputs(
            prompt, subject_image, beta, guidance_scale, num_inference_steps, resolution,
            callback_on_step_end_tensor_inputs, output_type,
        )
        beta = self.default_beta(mode) if beta is None else float(beta)
        if guidance_rescale is None:
            guidance_rescale = self.default_guidance_rescale
        _check_real("guidance_rescale", guidance_rescale)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        source = _as_rgb(image, "image")
        mask = _as_mask(mask_image, source.size)
        box = mask_box(mask)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        n = num_images_per_prompt

        # 2. Zoom-in: the square crop the model sees
        if zoom_in:
            crop_box = zoom_box(box, source.size, zoom_expansion)
        else:
            side = max(source.size)
            left, top = (source.width - side) // 2, (source.height - side) // 2
            crop_box = (left, top, left + side, top + side)
        # The trainer's own crop + resize (`crop_resize`), so the model sees what it was trained on.
        crop_pixels, crop_box = crop_resize(source, crop_box, resolution)  # the box snaps to its reduction's grid
        crop = Image.fromarray(crop_pixels)
        crop_mask = crop_with_padding(mask, crop_box, fill=0).resize((resolution, resolution), Image.Resampling.BILINEAR)
        # Any partial coverage counts as masked, so thin masks survive the downscale.
        mask_px = torch.from_numpy(np.asarray(crop_mask) > 0).float()[None, None]

        # 3. Encode the prompts: null text = "" tokens (Eq. 12), or the negative prompt
        text, pooled = self._encode_text(prompt or "", device)
        null_text, null_pooled = self._encode_text(negative_prompt or "", device)

        # 4. Encode the subject: image tokens (Assign), detail tokens + subject latent (Refine)
        refine = None
        null_image = self.model.null_image_embeds(1)
        if subject_image is not None:
            size = self.image_encoder.config.image_size
            subject = prepare_subject(subject_image, size, resolution, self.feature_extractor)
            image_embeds, detail = self.model.encode_subject(subject.clip_pixels[None].to(device))
            if use_refine and self.model.has_refine:
                refine_latents = self._encode_vae(subject.refine_pixels[None])
                refine_noise = randn_tensor(refine_latents.shape, generator=generator, device=device, dtype=refine_latents.dtype)
                refine = (refine_latents, refine_noise, detail)
        else:
            image_embeds = null_image  # text-only: the image branch sees the null condition

        # 5. Prepare the Locate inputs: source latents, masked-image latents, latent mask
        pixels = pixels_to_unit_range(chw_uint8(np.asarray(crop)))[None]  # the trainer's formula
        source_latents = self._encode_vae(pixels)
        masked_latents = self._encode_vae(pixels * (mask_px < 0.5))
        h, w = source_latents.shape[-2:]
        mask_latent = F.interpolate(mask_px, size=(h, w)).to(device=device, dtype=source_latents.dtype)

        # 6. Timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        noise = randn_tensor((n, 4, h, w), generator=generator, device=device, dtype=source_latents.dtype)
        latents = noise * self.scheduler.init_noise_sigma
        source_latents, masked_latents, mask_latent = (t.repeat(n, 1, 1, 1) for t in (source_latents, masked_latents, mask_latent))

        # 7. Batch the conditions: [uncond; cond] when guiding
        prompt_embeds, image_embeds = text.repeat(n, 1, 1), image_embeds.repeat(n, 1, 1)
        if do_cfg:
            cond_text = torch.cat([null_text.repeat(n, 1, 1), prompt_embeds])
            cond_image = torch.cat([null_image.repeat(n, 1, 1), image_embeds])
        else:
            cond_text, cond_image = prompt_embeds, image_embeds
        copies = 2 if do_cfg else 1
        mask_in = torch.cat([mask_latent] * copies)
        masked_in = torch.cat([masked_latents] * copies)
        added = self._added_conditions(pooled, null_pooled, crop_box, source.size, resolution, n, do_cfg, device)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        # 8. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * copies), t)
                refine_kwargs = {}
                if refine is not None:
                    ref_latents, ref_noise, detail = refine
                    # One RefineNet pass per step serves every image and both CFG halves.
                    refine_kwargs = dict(
                        refine_latents=self.scheduler.add_noise(ref_latents, ref_noise, t.reshape(1)),
                        detail_embeds=detail,
                    )
                noise_pred = self.model(
                    model_in, t.expand(model_in.shape[0]), mask_in, masked_in, cond_text, cond_image, beta=beta,
                    **refine_kwargs, **added,
                )
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, cond, guidance_rescale=guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

                # Eq. 3: the known background, noised to the next timestep (clean after the last step).
                if i < len(timesteps) - 1:
                    background = self.scheduler.add_noise(source_latents, noise, timesteps[i + 1].reshape(1))
                else:
                    background = source_latents
                latents = background * (1 - mask_latent) + latents * mask_latent

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": cond_text, "image_embeds": cond_image}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (outputs or {}).get("latents", latents)
                progress.update()

        # 9. Decode and paste back
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            arr = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            pasted = [
                paste_back(source, Image.fromarray(a), crop_box, mask, paste_dilation, paste_feather) for a in arr
            ]
            if output_type == "np":
                images = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pasted])
            else:
                images = pasted
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LARGenPipelineOutput(images=images, mode=mode, crop_box=tuple(int(v) for v in crop_box), beta=beta)
