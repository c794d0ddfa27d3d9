"""`largen convert-official`: the official LAR-Gen release (scepter, SDXL) into a `LARGenXLPipeline` folder.

The official checkpoint (`largen_ckpt_s22k.pth`) is a scepter state dict: `model.diffusion_model.*`
is an SGM-layout 9-channel `LargenUNetXL` whose `att_v2` transformer blocks carry the image-prompt
projections (`attn2.to_k_ip` / `attn2.to_v_ip`) beside the text ones, optionally with a refine
branch (`ref_*`, a copy of the UNet with a 4-channel input); `conditioner.embedders.5.*` is the
IP-Adapter-Plus embedder (the resampler `image_proj_model`, the detail `patch_projector`, and
possibly its CLIP ViT-H `image_encoder`); `first_stage_model.*`, when present, the VAE.

What maps where:
- the standard SDXL UNet keys: diffusers' own single-file converter
  (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`), into a plain
  `UNet2DConditionModel` whose config is read off the checkpoint's shapes;
- `attn2.to_k_ip` / `attn2.to_v_ip` (carried through that converter under the diffusers layer
  names): lar-gen's Assign adapter (`AssignAdapter`, one `IPAdapterAttnProcessor2_0` per attn2).
  The official block computes `attn(q, K_txt, V_txt) + scale * attn(q, K_img, V_img)` before the
  output projection, which is exactly that processor with `scale` = beta;
- `image_proj_model.*`: the resampler (it is the published IP-Adapter-Plus layout);
- the refine branch: a 4-channel `UNet2DConditionModel` (RefineNet) through the same converter;
  its `attn2.to_k_ip` / `to_v_ip` are dropped (the official branch never passes image tokens,
  so they cannot affect the output), and its head (`out.*`, which the official branch lacks and
  which never runs: RefineNet's pass stops after the last captured layer) is the main UNet's;
- `patch_projector`: a `DetailEncoder(kind="linear", features="last_all")` (one Linear on
  CLIP's last hidden states, CLS kept);
- VAE: `vae=` when given, else the checkpoint's when present (diffusers'
  `convert_ldm_vae_checkpoint`), else the base's; text encoders, tokenizers and the scheduler config: the SDXL base (`base=`).

Semantics carried over (the converted pipeline's saved defaults, `inference.sdxl`): text-guided
inpainting runs without image tokens (beta 0 skips the image branch), subject tasks scale the
image-prompt attention by the image scale in encoder and decoder alike (beta 1.0 by default), and
the official sampler: 50 DDIM "trailing" steps, guidance 7.5, guidance rescale 0.5.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
EMBEDDER_PREFIX = "conditioner.embedders.5."
VAE_PREFIX = "first_stage_model."
REF_PREFIX = "ref_"
logger = logging.getLogger(__name__)
_IP_KEY = re.compile(r"(.*\.attn2)\.(to_k_ip|to_v_ip)\.weight$")

# The official sampler and task handling (scepter largen_pro.yaml / largen_inference.py).
OFFICIAL_DEFAULTS = {
    "beta_text": 0.0,  # text-guided tasks pass no image tokens
    "beta_subject": 1.0,  # the release's image scale
    "beta_text_subject": 1.0,
    "guidance_rescale": 0.5,
}
OFFICIAL_STEPS = 50
OFFICIAL_GUIDANCE = 7.5


class OfficialCheckpointError(ValueError):
    """The file is not an official LAR-Gen checkpoint, or its parts do not fit together."""


@dataclass
class OfficialParts:
    """The official state dict split and renamed into lar-gen's parts (tensors are not copied).

    Attributes:
        unet: diffusers `UNet2DConditionModel` keys of the main 9-channel UNet (no IP k/v).
        unet_config: its diffusers config, read off the shapes.
        ip_kv: diffusers attn2 layer name -> (to_k_ip, to_v_ip) of the main UNet.
        refinenet, refinenet_config: the refine branch as a 4-channel UNet (None without it).
        resampler: the IP-Adapter-Plus resampler in the published layout (None when absent).
        detail: `DetailEncoder(kind="linear")` weights from `patch_projector` (None when absent).
        image_encoder: transformers `CLIPVisionModelWithProjection` keys (None when absent).
        vae: LDM VAE keys without the prefix (None when absent).
        dropped: official keys read but deliberately not kept (structurally unused).
        ignored: keys outside the parts this converter reads (e.g. text encoders).
    """

    unet: dict[str, torch.Tensor]
    unet_config: dict
    ip_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    refinenet: dict[str, torch.Tensor] | None = None
    refinenet_config: dict | None = None
    resampler: dict[str, torch.Tensor] | None = None
    detail: dict[str, torch.Tensor] | None = None
    image_encoder: dict[str, torch.Tensor] | None = None
    vae: dict[str, torch.Tensor] | None = None
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _count(prefix: str, keys) -> int:
    """Number of numbered children `prefix.N` among `keys`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def unet_config_from_official(
    unet: Mapping[str, torch.Tensor], sample_size: int = 128, addition_time_embed_dim: int = 256,
    head_channels: int = 64,
) -> dict:
    """The diffusers `UNet2DConditionModel` config of an SGM-layout SDXL UNet state dict (no prefix).

    Read off the shapes: input channels and base width (`input_blocks.0.0`), the levels (one
    more than the downsamplers), resnets per level, each level's width and transformer depth, the
    middle depth, the cross-attention width and the added-embedding input. What the shapes
    cannot tell comes from the arguments (SDXL: latent side 128, 256 per time id, 64-wide heads,
    as in the official `NUM_HEADS_CHANNELS: 64`).

    Raises:
        OfficialCheckpointError: a key the layout needs is missing.
    """
    try:
        conv_in = unet["input_blocks.0.0.weight"]
        keys = list(unet)
        n_input = _count("input_blocks", keys)
        downs = [i for i in range(n_input) if f"input_blocks.{i}.0.op.weight" in unet]
        levels = len(downs) + 1
        per_level = (n_input - 1 - len(downs)) // levels
        widths, depths, has_attn = [], [], []
        index = 1
        for _ in range(levels):
            widths.append(unet[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0])
            depth = _count(f"input_blocks.{index}.1.transformer_blocks", keys)
            has_attn.append(depth > 0)
            depths.append(max(depth, 1))
            index += per_level + 1
        mid_depth = _count("middle_block.1.transformer_blocks", keys)
        attn2_k = next(k for k in keys if k.endswith("attn2.to_k.weight"))
        proj_in = next(unet[k] for k in keys if k.endswith(".proj_in.weight"))
        adm_in = unet["label_emb.0.0.weight"].shape[1]
    except (KeyError, StopIteration) as err:
        raise OfficialCheckpointError(f"not an SGM-layout SDXL UNet: {err} is missing") from err
    return {
        "sample_size": sample_size,
        "in_channels": conv_in.shape[1],
        "out_channels": unet["out.2.weight"].shape[0] if "out.2.weight" in unet else 4,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": widths,
        "layers_per_block": per_level,
        "transformer_layers_per_block": depths,
        "attention_head_dim": [w // head_channels for w in widths],
        "use_linear_projection": proj_in.ndim == 2,
        "cross_attention_dim": unet[attn2_k].shape[1],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": adm_in,
        "norm_num_groups": 32,
        "_mid_depth": mid_depth,
    }


def _diffusers_config(config: dict) -> dict:
    # diffusers' UNet takes one depth for the mid block from the last level's entry; the official
    # mid depth (TRANSFORMER_DEPTH_MIDDLE unset = the last level's) must agree.
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    mid = config.get("_mid_depth")
    if mid is not None and mid != out["transformer_layers_per_block"][-1]:
        raise OfficialCheckpointError(
            f"the middle block has {mid} transformer layers, the last level {out['transformer_layers_per_block'][-1]}; "
            "diffusers' UNet needs them equal"
        )
    return out


def _convert_unet(unet: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict]:
    """SGM keys (no prefix) -> (diffusers keys without IP k/v, {attn2 layer: (k_ip, v_ip)})."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    try:
        converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in unet.items()}, config)
    except KeyError as err:
        raise OfficialCheckpointError(f"the UNet has no {err.args[0]!r}: incomplete or not the SGM layout") from err
    # diffusers' converter skips what it does not know; every official key must have landed somewhere.
    seen = {id(v) for v in converted.values()}
    lost = sorted(k for k, v in unet.items() if id(v) not in seen)
    if lost or len(converted) != len(unet):
        raise OfficialCheckpointError(
            f"{len(lost) or abs(len(converted) - len(unet))} UNet keys have no diffusers counterpart, e.g. {lost[:3]}"
        )
    ip: dict[str, list] = {}
    plain = {}
    for key, value in converted.items():
        match = _IP_KEY.match(key)
        if match:
            ip.setdefault(match.group(1), [None, None])[0 if match.group(2) == "to_k_ip" else 1] = value
        else:
            plain[key] = value
    return plain, {name: (kv[0], kv[1]) for name, kv in ip.items()}


def split_official_state_dict(
    state: Mapping[str, torch.Tensor], sample_size: int = 128, addition_time_embed_dim: int = 256,
    head_channels: int = 64,
) -> OfficialParts:
    """Split and rename an official state dict into lar-gen's parts (`OfficialParts`); no weights are copied.

    Args:
        state: the checkpoint (`sd["model"]` already unwrapped), tensors on any device, meta included.
        sample_size, addition_time_embed_dim, head_channels: see `unet_config_from_official`.

    Raises:
        OfficialCheckpointError: no `model.diffusion_model.*` UNet, a refine branch without its
            `patch_projector`, or an IP key without its pair.
    """
    unet, ref, embedder, vae, ignored = {}, {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            rest = key[len(UNET_PREFIX):]
            (ref if rest.startswith(REF_PREFIX) else unet)[rest.removeprefix(REF_PREFIX)] = value
        elif key.startswith(EMBEDDER_PREFIX):
            embedder[key[len(EMBEDDER_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        else:
            ignored.append(key)
    if not unet:
        raise OfficialCheckpointError(
            f"no {UNET_PREFIX}* keys: not an official LAR-Gen checkpoint (largen_ckpt_s22k.pth)"
        )
    config = unet_config_from_official(unet, sample_size, addition_time_embed_dim, head_channels)
    if config["in_channels"] != 9:
        raise OfficialCheckpointError(f"the UNet takes {config['in_channels']} channels; LAR-Gen's takes 9")
    plain, ip_kv = _convert_unet(unet, _diffusers_config(config))
    if not ip_kv or any(k is None or v is None for k, v in ip_kv.values()):
        raise OfficialCheckpointError("the UNet's attn2 layers lack to_k_ip/to_v_ip pairs (not an att_v2 LargenUNetXL)")
    parts = OfficialParts(unet=plain, unet_config=config, ip_kv=ip_kv, ignored=ignored)

    if ref:
        if "patch_projector.weight" not in embedder:
            raise OfficialCheckpointError("the checkpoint has a refine branch but no conditioner patch_projector")
        # The branch has no head of its own; RefineNet's never runs, so the main UNet's fills it.
        for head in ("out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"):
            if head not in unet:
                raise OfficialCheckpointError(f"the UNet has no {UNET_PREFIX}{head}")
            ref.setdefault(head, unet[head])
        ref_config = unet_config_from_official(ref, sample_size, addition_time_embed_dim, head_channels)
        ref_plain, ref_ip = _convert_unet(ref, _diffusers_config(ref_config))
        parts.refinenet, parts.refinenet_config = ref_plain, ref_config
        parts.dropped = sorted(
            f"{UNET_PREFIX}{REF_PREFIX}{k}" for k in ref if _IP_KEY.match(k)
        )
        del ref_ip
    resampler = {k[len("image_proj_model."):]: v for k, v in embedder.items() if k.startswith("image_proj_model.")}
    parts.resampler = resampler or None
    if "patch_projector.weight" in embedder:
        parts.detail = {k.replace("patch_projector.", "proj."): v for k, v in embedder.items() if k.startswith("patch_projector.")}
    encoder = {k[len("image_encoder."):]: v for k, v in embedder.items() if k.startswith("image_encoder.")}
    parts.image_encoder = encoder or None
    known = ("image_proj_model.", "image_encoder.", "patch_projector.")
    parts.ignored += [EMBEDDER_PREFIX + k for k in embedder if not k.startswith(known)]
    parts.vae = vae or None
    return parts


def published_adapter_state(parts: OfficialParts, unet) -> dict[str, torch.Tensor]:
    """The Assign adapter's weights in the published flat layout, numbered for `unet` (a diffusers UNet).

    Raises:
        OfficialCheckpointError: no resampler, or the IP layers do not match `unet`'s attn2 layers.
    """
    from inference.model import _cross_attention_layers

    if parts.resampler is None:
        raise OfficialCheckpointError(
            "the checkpoint has no conditioner image_proj_model (the IP-Adapter-Plus resampler): "
            "give the official ip-adapter-plus_sdxl_vit-h file"
        )
    layers = _cross_attention_layers(unet)
    names = {name for name, _, _ in layers}
    if names != set(parts.ip_kv):
        extra, missing = sorted(set(parts.ip_kv) - names), sorted(names - set(parts.ip_kv))
        raise OfficialCheckpointError(f"IP layers do not match the UNet: extra {extra[:3]}, missing {missing[:3]}")
    state = {f"image_proj.{k}": v for k, v in parts.resampler.items()}
    for name, key_id, _ in layers:
        k, v = parts.ip_kv[name]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = k
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = v
    return state


def _read(path: Path):
    """The object in a `.safetensors` or PyTorch file (`torch.load(weights_only=True)`: no code runs).

    Raises:
        OfficialCheckpointError: the file cannot be read as either.
    """
    import zipfile

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # mmap spares a copy of the 10 GB file, but only the zip format (torch >= 1.6) supports it.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OfficialCheckpointError(
            f"cannot read {str(path)!r} as a PyTorch or safetensors checkpoint ({type(err).__name__}: {first})"
        ) from err
    return state


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the official checkpoint (`.pth` via `torch.load(weights_only=True)`, or `.safetensors`).

    Raises:
        OfficialCheckpointError: unreadable, or not a state dict.
    """
    path = Path(path)
    state = _read(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict):
        # Training checkpoints may carry counters beside the weights; only tensors matter here.
        state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not isinstance(state, dict) or not state:
        raise OfficialCheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def _load_resampler_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `image_proj` part of an IP-Adapter-Plus file (official nested `.bin`, or flat `.safetensors`)."""
    from inference.model import split_published_state_dict

    state = _read(Path(path))
    try:
        if not isinstance(state, dict):
            raise ValueError("not a state dict")
        return split_published_state_dict(state)["image_proj"]
    except ValueError as err:
        raise OfficialCheckpointError(f"{str(path)!r}: {err}") from err


def convert_official(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    base: str | os.PathLike = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    image_prompt: str | os.PathLike = "h94/IP-Adapter",
    image_encoder_folder: str = "models/image_encoder",
    ip_adapter: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = torch.float16,
    head_channels: int = 64,
):
    """Convert the official release into a `LARGenXLPipeline` folder at `out` (written atomically).

    Args:
        checkpoint: `largen_ckpt_s22k.pth` (path) or its state dict.
        out: the pipeline folder to write.
        base: SDXL-inpainting hub id or folder: text encoders, tokenizers, scheduler config, and the
            VAE when neither the checkpoint nor `vae` has one. Its UNet is not loaded.
        image_prompt, image_encoder_folder: where the CLIP ViT-H image encoder is (its config, and
            its weights unless the checkpoint carries them).
        ip_adapter: IP-Adapter-Plus SDXL file for the resampler when the checkpoint lacks it
            (`ip-adapter-plus_sdxl_vit-h.bin` / `.safetensors`).
        vae: VAE hub id or folder (e.g. the fp16-fix VAE); it replaces the checkpoint's and the base's.
        torch_dtype: dtype of every saved component (None: as loaded; float32 for the base parts).
        head_channels: attention head width of the official UNet (64).

    Returns:
        The converted pipeline (in memory; also saved at `out`).

    Raises:
        OfficialCheckpointError: the checkpoint is not the official layout or misses a part.
        CheckpointNotFoundError: `base`, `vae` or the image encoder cannot be loaded.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from inference.loading import CheckpointNotFoundError, _require_local, load_image_encoder
    from inference.model import AssignAdapter, DetailEncoder, LARGenModel
    from inference.pipeline import ddim_trailing
    from inference.sdxl import LARGenXLPipeline

    state = load_official_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    base_ref = os.fspath(base)

    def component(cls, ref, subfolder, role):
        where = f"{os.fspath(ref)!r}" + (f" ({subfolder}/)" if subfolder else "")
        _require_local(ref, role, *([subfolder] if subfolder else []))
        try:
            return cls.from_pretrained(ref, subfolder=subfolder)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointNotFoundError(f"{role}: cannot load {where}: {first}") from err

    text_encoder_2 = component(CLIPTextModelWithProjection, base_ref, "text_encoder_2", "SDXL base")
    pooled = text_encoder_2.config.projection_dim
    adm_in = state.get("model.diffusion_model.label_emb.0.0.weight")
    time_dim = 256 if adm_in is None else (adm_in.shape[1] - pooled) // 6
    try:
        base_unet_config = UNet2DConditionModel.load_config(base_ref, subfolder="unet")
    except OSError:
        base_unet_config = {}
    parts = split_official_state_dict(
        state, sample_size=base_unet_config.get("sample_size", 128), addition_time_embed_dim=time_dim,
        head_channels=head_channels,
    )
    if parts.resampler is None and ip_adapter is not None:
        parts.resampler = _load_resampler_file(ip_adapter)
    if parts.ignored:
        groups = sorted({".".join(k.split(".")[:3]) for k in parts.ignored})
        logger.warning(
            "%d checkpoint keys are not converted (%s): the text encoders come from the SDXL base %r",
            len(parts.ignored), ", ".join(groups[:4]), base_ref,
        )

    unet = _unet_from(parts.unet_config, parts.unet, "UNet")
    adapter = AssignAdapter.from_published(published_adapter_state(parts, unet), unet)

    encoder, processor = load_image_encoder(image_prompt, image_encoder_folder)
    if parts.image_encoder is not None:
        _load_strict(encoder, parts.image_encoder, "image encoder", allow_missing=("vision_model.embeddings.position_ids",))
    refinenet = detail = None
    if parts.refinenet is not None:
        refinenet = _unet_from(parts.refinenet_config, parts.refinenet, "RefineNet")
        w = parts.detail["proj.weight"]
        detail = DetailEncoder(in_dim=w.shape[1], out_dim=w.shape[0], kind="linear", features="last_all")
        _load_strict(detail, parts.detail, "detail encoder")

    if vae is not None:  # asked for by name (e.g. the fp16-fix VAE): it wins over the checkpoint's
        vae_model = component(AutoencoderKL, vae, None, "VAE")
    elif parts.vae is not None:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        _require_local(base_ref, "SDXL base", "vae")
        try:
            vae_config = AutoencoderKL.load_config(base_ref, subfolder="vae")
        except OSError as err:
            raise CheckpointNotFoundError(f"SDXL base: cannot load the VAE config of {base_ref!r}: {err}") from err
        vae_model = AutoencoderKL.from_config(vae_config)
        _load_strict(vae_model, convert_ldm_vae_checkpoint(parts.vae, vae_model.config), "VAE")
    else:
        vae_model = component(AutoencoderKL, base_ref, "vae", "SDXL base")
    text_encoder = component(CLIPTextModel, base_ref, "text_encoder", "SDXL base")
    tokenizer = component(CLIPTokenizer, base_ref, "tokenizer", "SDXL base")
    tokenizer_2 = component(CLIPTokenizer, base_ref, "tokenizer_2", "SDXL base")
    try:
        scheduler_config = DDIMScheduler.load_config(base_ref, subfolder="scheduler")
    except OSError as err:
        raise CheckpointNotFoundError(f"SDXL base: cannot load {base_ref!r}/scheduler: {err}") from err

    model = LARGenModel(unet, adapter, encoder.eval(), refinenet, detail)
    pipe = LARGenXLPipeline.from_model(
        model, vae_model, text_encoder, tokenizer, ddim_trailing(scheduler_config), processor,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, **OFFICIAL_DEFAULTS,
    )
    if torch_dtype is not None:
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                # nn.Module.to: ModelMixin.to warns on every cast, and this one is deliberate.
                torch.nn.Module.to(part, dtype=torch_dtype)
    pipe.save_pretrained(out)
    return pipe


def _unet_from(config: dict, state: Mapping[str, torch.Tensor], what: str):
    """A UNet2DConditionModel holding `state`'s tensors themselves (built on the meta device, no copy).

    At full size the UNet is 2.6B parameters: allocating it and then copying the checkpoint in
    would need twice the memory.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_diffusers_config(config))
    _load_strict(unet, state, what, assign=True)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise OfficialCheckpointError(f"{what}: no weights for {left[:3]}")
    return unet


def _load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, allow_missing=(), assign: bool = False
) -> None:
    """Load every key of `module` from `state` and nothing else; shapes must match exactly.

    Raises:
        OfficialCheckpointError: missing, unexpected or mis-shaped keys (named).
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in allow_missing)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise OfficialCheckpointError(
            f"{what}: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(shapes)} of the wrong shape {shapes[:3]}"
        )
    module.load_state_dict(dict(state), strict=not allow_missing, assign=assign)
