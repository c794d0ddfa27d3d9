"""Load the diffusion roles (inpaint base, IP-Adapter-Plus image prompt) from a hub id or a local folder.

The same functions load the real checkpoints (`stable-diffusion-v1-5/stable-diffusion-inpainting`,
`h94/IP-Adapter`) and the tiny offline zoo built by `inference.tiny_models`; both go through the
libraries' own `from_pretrained` / `load_ip_adapter`, so the tiny tests exercise the real code path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionInpaintPipeline
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

ROLE_INPAINT_BASE = "inpaint base"
ROLE_IMAGE_PROMPT = "image prompt"
ROLE_IMAGE_ENCODER = "image encoder"

DEFAULT_IP_ADAPTER_SUBFOLDER = "models"
DEFAULT_IP_ADAPTER_WEIGHT = "ip-adapter-plus_sd15.safetensors"
DEFAULT_IMAGE_ENCODER_FOLDER = "image_encoder"


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint named in the config (hub id or local folder) cannot be found or loaded."""


def _looks_like_local_path(ref: str) -> bool:
    """True when `ref` can only mean a folder: it exists, or it is not shaped like `owner/name`."""
    if Path(ref).expanduser().exists():
        return True
    if ref.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in ref):
        return True
    return ref.count("/") != 1


def _require_local(ref: str | os.PathLike, role: str, *required: str) -> Path | None:
    """Check a local `ref` and the files inside it that `role` needs; None for a hub id.

    Raises:
        CheckpointNotFoundError: `ref` is a missing folder, or lacks one of `required`.
    """
    ref_str = os.fspath(ref)
    if not _looks_like_local_path(ref_str):
        return None
    path = Path(ref_str).expanduser()
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{role}: checkpoint folder {ref_str!r} does not exist. Build the tiny zoo with "
            f"`make tiny-models`, or point the profile at a hub id or a downloaded checkpoint."
        )
    for rel in required:
        if not (path / rel).exists():
            raise CheckpointNotFoundError(f"{role}: {ref_str!r} has no {rel!r}; is it the right checkpoint?")
    return path


def load_inpaint_base(
    ref: str | os.PathLike, torch_dtype: torch.dtype | None = None
) -> StableDiffusionInpaintPipeline:
    """Load an SD-1.5-inpainting-layout pipeline (9-channel UNet) without the safety checker.

    Args:
        ref: hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-inpainting`) or a local folder
            written by `save_pretrained` (vae, text_encoder, tokenizer, unet, scheduler;
            feature_extractor optional).
        torch_dtype: dtype for the weights; None keeps the stored dtype (float32 on CPU).

    Returns:
        The pipeline, on CPU, with `safety_checker=None`.

    Raises:
        CheckpointNotFoundError: the folder or hub id cannot be found or loaded.
        ValueError: the UNet is not an inpainting UNet (in_channels != 9).
    """
    ref_str = os.fspath(ref)
    _require_local(ref_str, ROLE_INPAINT_BASE, "model_index.json", "unet", "vae", "text_encoder", "tokenizer")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            ref_str, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except OSError as err:
        raise CheckpointNotFoundError(f"{ROLE_INPAINT_BASE}: cannot load {ref_str!r}: {err}") from err
    in_channels = pipe.unet.config.in_channels
    if in_channels != 9:
        raise ValueError(
            f"{ROLE_INPAINT_BASE}: {ref_str!r} has a {in_channels}-channel UNet; LAR-Gen needs the "
            f"9-channel inpainting UNet ([z; m; z_masked])."
        )
    return pipe


def _image_encoder_subfolder(subfolder: str, image_encoder_folder: str) -> str:
    # Same rule as diffusers' `load_ip_adapter`: a bare name lives inside `subfolder`.
    if "/" not in image_encoder_folder:
        return Path(subfolder, image_encoder_folder).as_posix()
    return Path(image_encoder_folder).as_posix()


def _load_image_processor(path_or_repo: str, subfolder: str, image_size: int) -> CLIPImageProcessor:
    """The image processor saved beside the encoder, else the one diffusers would build."""
    local = _require_local(path_or_repo, ROLE_IMAGE_ENCODER)
    if local is not None and not (local / subfolder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor(size=image_size, crop_size=image_size)
    try:
        return CLIPImageProcessor.from_pretrained(path_or_repo, subfolder=subfolder)
    except OSError:
        # h94/IP-Adapter ships no preprocessor config next to its encoder; diffusers then
        # builds exactly this default, sized to the encoder.
        return CLIPImageProcessor(size=image_size, crop_size=image_size)


def load_image_encoder(
    path_or_repo: str | os.PathLike,
    subfolder: str = f"{DEFAULT_IP_ADAPTER_SUBFOLDER}/{DEFAULT_IMAGE_ENCODER_FOLDER}",
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """Load the CLIP image encoder of an IP-Adapter repo and the processor that feeds it.

    Args:
        path_or_repo: hub id (e.g. `h94/IP-Adapter`) or local folder.
        subfolder: folder of the encoder inside it (`models/image_encoder` for SD 1.5).

    Returns:
        (encoder, processor). The processor is the saved one, else a CLIP default sized to the
        encoder's `image_size` (what diffusers builds when none is saved).

    Raises:
        CheckpointNotFoundError: the folder, or the encoder inside it, cannot be found or loaded.
    """
    ref_str = os.fspath(path_or_repo)
    _require_local(ref_str, ROLE_IMAGE_ENCODER, f"{subfolder}/config.json")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(ref_str, subfolder=subfolder)
    except OSError as err:
        raise CheckpointNotFoundError(
            f"{ROLE_IMAGE_ENCODER}: cannot load {ref_str!r}/{subfolder}: {err}"
        ) from err
    processor = _load_image_processor(ref_str, subfolder, encoder.config.image_size)
    return encoder, processor


def _crop_size(processor: CLIPImageProcessor) -> int | None:
    crop = getattr(processor, "crop_size", None)
    if isinstance(crop, dict):
        return crop.get("height")
    return crop


def load_image_prompt(
    pipe: StableDiffusionInpaintPipeline,
    repo: str | os.PathLike,
    subfolder: str = DEFAULT_IP_ADAPTER_SUBFOLDER,
    weight_name: str = DEFAULT_IP_ADAPTER_WEIGHT,
    image_encoder_folder: str = DEFAULT_IMAGE_ENCODER_FOLDER,
) -> StableDiffusionInpaintPipeline:
    """Load IP-Adapter-Plus (as published in `h94/IP-Adapter`) into `pipe` with diffusers' own loader.

    After this, every `attn2` processor of `pipe.unet` is an `IPAdapterAttnProcessor2_0` holding
    `to_k_ip`/`to_v_ip`, `pipe.unet.encoder_hid_proj.image_projection_layers[0]` is the
    `IPAdapterPlusImageProjection` resampler, `pipe.image_encoder` is the CLIP vision tower and
    `pipe.feature_extractor` a processor sized to it.

    Args:
        pipe: the inpaint base, e.g. from `load_inpaint_base`.
        repo: hub id (`h94/IP-Adapter`) or a local folder with the same layout.
        subfolder: folder of the weight file inside `repo`.
        weight_name: the IP-Adapter safetensors file (original flat `image_proj.*` / `ip_adapter.*` keys).
        image_encoder_folder: encoder folder, relative to `subfolder` when it is a bare name.

    Returns:
        `pipe`, modified in place.

    Raises:
        CheckpointNotFoundError: the folder, weight file or image encoder cannot be found or loaded.
    """
    ref_str = os.fspath(repo)
    encoder_subfolder = _image_encoder_subfolder(subfolder, image_encoder_folder)
    required = [f"{subfolder}/{weight_name}"]
    if getattr(pipe, "image_encoder", None) is None:
        required.append(f"{encoder_subfolder}/config.json")
    _require_local(ref_str, ROLE_IMAGE_PROMPT, *required)
    had_feature_extractor = getattr(pipe, "feature_extractor", None) is not None
    try:
        pipe.load_ip_adapter(
            ref_str, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=image_encoder_folder
        )
    except OSError as err:
        raise CheckpointNotFoundError(
            f"{ROLE_IMAGE_PROMPT}: cannot load {weight_name!r} from {ref_str!r}/{subfolder}: {err}"
        ) from err
    # The inpaint base may carry a feature extractor sized for another encoder (or none): feed the
    # image encoder at its own resolution.
    image_size = pipe.image_encoder.config.image_size
    if not had_feature_extractor or _crop_size(pipe.feature_extractor) != image_size:
        pipe.register_modules(feature_extractor=_load_image_processor(ref_str, encoder_subfolder, image_size))
    return pipe


def load_ip_adapter_state_dict(
    repo: str | os.PathLike,
    subfolder: str = DEFAULT_IP_ADAPTER_SUBFOLDER,
    weight_name: str = DEFAULT_IP_ADAPTER_WEIGHT,
) -> dict[str, torch.Tensor]:
    """Read an IP-Adapter safetensors file as published (flat `image_proj.*` / `ip_adapter.*` keys).

    For LAR-Gen's own model (`inference.model.AssignAdapter.from_published`), which keeps the image
    projection outside the UNet; `load_image_prompt` is the diffusers-pipeline counterpart.

    Args:
        repo: hub id (`h94/IP-Adapter`) or a local folder with the same layout.
        subfolder: folder of the weight file inside `repo`.
        weight_name: a `.safetensors` file (pickled `.bin` checkpoints are refused).

    Returns:
        The flat state dict, on CPU.

    Raises:
        CheckpointNotFoundError: the folder or file cannot be found or read.
        ValueError: `weight_name` is not a safetensors file.
    """
    from safetensors.torch import load_file

    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"{ROLE_IMAGE_PROMPT}: {weight_name!r} is not a .safetensors file; only safetensors are loaded")
    ref_str = os.fspath(repo)
    rel = Path(subfolder, weight_name).as_posix() if subfolder else weight_name
    local = _require_local(ref_str, ROLE_IMAGE_PROMPT, rel)
    try:
        if local is not None:
            path = local / rel
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(ref_str, weight_name, subfolder=subfolder or None)
        return load_file(str(path))
    except OSError as err:
        raise CheckpointNotFoundError(f"{ROLE_IMAGE_PROMPT}: cannot read {rel!r} from {ref_str!r}: {err}") from err
