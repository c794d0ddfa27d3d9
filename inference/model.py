"""The LAR-Gen model (paper section 4): Locate, Assign and Refine on diffusers' UNet2DConditionModel.

Shared by the pipeline (inference) and the trainer (training imports this module); nothing here
forks the UNet, every mechanism is an attention-processor swap:

- Locate: the main UNet is the 9-channel inpainting UNet; `LARGenModel.forward` builds `[z; m*; z_s]`.
  (The Eq. 3 background blend is a sampling step: `inference.pipeline`.)
- Assign: diffusers' `IPAdapterAttnProcessor2_0` on every cross-attention (`attn2`) layer computes
  `Z + beta * Z'`; `beta` is the processors' `scale`. The image tokens come from the CLIP image
  encoder's penultimate hidden states through diffusers' `IPAdapterPlusImageProjection` (16 tokens).
- Refine: `RefineNet` is a 4-channel copy of the main UNet (`refinenet_from_unet`) whose
  cross-attention context is `DetailEncoder(CLIP patch features)`; its decoder self-attention inputs
  go into the keys/values of the main UNet's matching layers (`inference.attention`).

Notes on the contract (what differs from the first sketch, and why):
- The IP-Adapter weights (resampler + `to_k_ip`/`to_v_ip`) are one component, `AssignAdapter`
  (`pipe.ip_adapter`), saved in the *published* IP-Adapter-Plus flat layout (`image_proj.*`,
  `ip_adapter.{k}.to_k_ip.weight`), so one loader reads both our folders and `h94/IP-Adapter`'s
  file, and the `unet` folder stays a plain `UNet2DConditionModel`. `LARGenModel.image_proj` is
  still the diffusers `IPAdapterPlusImageProjection` (`model.ip_adapter.image_proj`).
- `forward(..., refine_latents)` accepts a RefineNet batch that divides the main batch; its features
  are tiled in blocks. The pipeline uses this to run RefineNet once per step for both CFG halves.
- `forward(..., image_embeds=None)` means the null image condition (`null_image_embeds`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

from inference.attention import RefineBank, RefineCaptured, decoder_self_attention_layers, install_refine

ADAPTER_WEIGHT_NAME = "ip-adapter-plus.safetensors"


# ---------------------------------------------------------------------------------------------
# Published IP-Adapter-Plus layout <-> diffusers module names (both directions, any depth).
# ---------------------------------------------------------------------------------------------

_TO_DIFFUSERS = [
    (r"layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
    (r"layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
]
_TO_PUBLISHED = [
    (r"layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]
_TO_KV = re.compile(r"layers\.(\d+)\.0\.to_kv\.weight")
_TO_K = re.compile(r"layers\.(\d+)\.attn\.to_k\.weight")


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def resampler_state_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published IP-Adapter-Plus `Resampler` keys (without `image_proj.`) -> `IPAdapterPlusImageProjection` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        kv = _TO_KV.fullmatch(key)
        if kv:
            k, v = value.chunk(2, dim=0)
            out[f"layers.{kv.group(1)}.attn.to_k.weight"] = k
            out[f"layers.{kv.group(1)}.attn.to_v.weight"] = v
        else:
            out[_rename(key, _TO_DIFFUSERS)] = value
    return out


def resampler_state_to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `resampler_state_to_diffusers`: the layout `h94/IP-Adapter` publishes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attn.to_v.weight" in key:
            continue  # folded into to_kv with its to_k
        k = _TO_K.fullmatch(key)
        if k:
            layer = k.group(1)
            out[f"layers.{layer}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{layer}.attn.to_v.weight"]], 0)
        else:
            out[_rename(key, _TO_PUBLISHED)] = value
    return out


def split_published_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat published keys (`image_proj.*`, `ip_adapter.*`) -> {"image_proj": {...}, "ip_adapter": {...}}."""
    if set(state) == {"image_proj", "ip_adapter"}:
        return state  # already nested (the layout of the original .bin files)
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in nested:
            raise ValueError(f"IP-Adapter weights: unexpected key {key!r} (expected image_proj.* or ip_adapter.*)")
        nested[head][rest] = value
    if "latents" not in nested["image_proj"]:
        raise ValueError(
            "IP-Adapter weights: no image_proj.latents; LAR-Gen needs an IP-Adapter-*Plus* checkpoint "
            "(the resampler with 16 query tokens), not the plain or face-id variants"
        )
    return nested


def _to_like(module: ModelMixin, device: torch.device, dtype: torch.dtype) -> ModelMixin:
    # ModelMixin.to() logs a warning on every dtype cast, even a no-op one: only move when needed.
    if module.device != device or module.dtype != dtype:
        module = module.to(device=device, dtype=dtype)
    return module


def _cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[str, int, int]]:
    """(layer name, published key id, hidden size) for every attn2 layer, in `unet.attn_processors` order.

    The published `ip_adapter.{k}` numbers every processor (attn1 and attn2) in that order, as the
    original `nn.ModuleList(unet.attn_processors.values())` did.
    """
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ValueError(
            "the main UNet has an encoder_hid_proj (e.g. from diffusers' load_ip_adapter); LAR-Gen keeps the "
            "image projection outside the UNet: load a plain UNet2DConditionModel"
        )
    channels = list(unet.config.block_out_channels)
    layers = []
    for key_id, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        layers.append((name[: -len(".processor")], key_id, hidden))
    return layers


class AssignAdapter(ModelMixin, ConfigMixin):
    """Assign's weights: the IP-Adapter-Plus resampler and the decoupled cross-attention `to_k_ip`/`to_v_ip`.

    `install(unet)` puts this adapter's `IPAdapterAttnProcessor2_0` modules on the UNet's `attn2`
    layers (shared, not copied), so training the UNet trains them. Saved as `config.json` +
    `ip-adapter-plus.safetensors` in the published flat layout.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        layers: list[str],
        key_ids: list[int],
        hidden_sizes: list[int],
        cross_attention_dim: int,
        image_embed_dim: int,
        resampler_dim: int,
        resampler_heads: int,
        resampler_depth: int = 4,
        resampler_dim_head: int = 64,
        num_tokens: int = 16,
        ffn_ratio: float = 4,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(key_ids) == len(hidden_sizes)):
            raise ValueError("AssignAdapter: layers, key_ids and hidden_sizes must have the same length")
        self.image_proj = IPAdapterPlusImageProjection(
            embed_dims=image_embed_dim,
            output_dims=cross_attention_dim,
            hidden_dims=resampler_dim,
            depth=resampler_depth,
            dim_head=resampler_dim_head,
            heads=resampler_heads,
            num_queries=num_tokens,
            ffn_ratio=ffn_ratio,
        )
        self.attn_processors = nn.ModuleList(
            IPAdapterAttnProcessor2_0(hidden, cross_attention_dim, num_tokens=[num_tokens], scale=1.0)
            for hidden in hidden_sizes
        )

    # -- construction from the published checkpoint -----------------------------------------
    @classmethod
    def for_unet(
        cls,
        unet: UNet2DConditionModel,
        image_embed_dim: int,
        resampler_dim: int = 768,
        resampler_heads: int = 12,
        num_tokens: int = 16,
    ) -> AssignAdapter:
        """A new (randomly initialised) adapter sized for `unet` and an image encoder of width `image_embed_dim`.

        Defaults are IP-Adapter-Plus SD 1.5's resampler (width 768, 12 heads, 16 tokens).
        """
        layers = _cross_attention_layers(unet)
        adapter = cls(
            layers=[name for name, _, _ in layers],
            key_ids=[key_id for _, key_id, _ in layers],
            hidden_sizes=[hidden for _, _, hidden in layers],
            cross_attention_dim=unet.config.cross_attention_dim,
            image_embed_dim=image_embed_dim,
            resampler_dim=resampler_dim,
            resampler_heads=resampler_heads,
            num_tokens=num_tokens,
        )
        return _to_like(adapter, unet.device, unet.dtype)

    @classmethod
    def from_published(cls, state: dict[str, torch.Tensor], unet: UNet2DConditionModel) -> AssignAdapter:
        """Build from IP-Adapter-Plus weights in the published layout (e.g. `h94/IP-Adapter`) for `unet`.

        Args:
            state: flat (`image_proj.*`, `ip_adapter.*`) or nested state dict.
            unet: the main UNet the adapter is for (layer names, hidden sizes, cross-attention dim).

        Raises:
            ValueError: not an IP-Adapter-Plus checkpoint, or its shapes do not fit `unet`.
        """
        nested = split_published_state_dict(state)
        proj = nested["image_proj"]
        layers = _cross_attention_layers(unet)
        depth = 1 + max(int(k.split(".")[1]) for k in proj if k.startswith("layers."))
        adapter = cls(
            layers=[name for name, _, _ in layers],
            key_ids=[key_id for _, key_id, _ in layers],
            hidden_sizes=[hidden for _, _, hidden in layers],
            cross_attention_dim=unet.config.cross_attention_dim,
            image_embed_dim=proj["proj_in.weight"].shape[1],
            resampler_dim=proj["latents"].shape[2],
            # Same rule as diffusers' converter: the published resampler uses 64-wide heads.
            resampler_heads=proj["layers.0.0.to_q.weight"].shape[0] // 64,
            resampler_depth=depth,
            num_tokens=proj["latents"].shape[1],
        )
        adapter.load_published_state_dict(nested)
        return _to_like(adapter, unet.device, unet.dtype)

    def load_published_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load published-layout weights into this adapter (strict: every key must match).

        Raises:
            ValueError: missing/unexpected keys or wrong shapes, with the offending names.
        """
        nested = split_published_state_dict(state)
        if nested["image_proj"]["proj_out.weight"].shape[0] != self.config.cross_attention_dim:
            raise ValueError(
                f"IP-Adapter weights project to {nested['image_proj']['proj_out.weight'].shape[0]} channels, "
                f"but the UNet's cross_attention_dim is {self.config.cross_attention_dim}; wrong base model?"
            )
        own = {f"image_proj.{k}": v for k, v in resampler_state_to_diffusers(nested["image_proj"]).items()}
        for i, key_id in enumerate(self.config.key_ids):
            for proj in ("to_k_ip", "to_v_ip"):
                key = f"{key_id}.{proj}.weight"
                if key not in nested["ip_adapter"]:
                    raise ValueError(
                        f"IP-Adapter weights have no ip_adapter.{key} for {self.config.layers[i]}; wrong base model?"
                    )
                own[f"attn_processors.{i}.{proj}.0.weight"] = nested["ip_adapter"][key]
        expected = {k for k in nested["ip_adapter"] if k.split(".")[0] in {str(k_) for k_ in self.config.key_ids}}
        extra = set(nested["ip_adapter"]) - expected
        if extra:
            raise ValueError(f"IP-Adapter weights have layers this UNet lacks: {sorted(extra)[:4]}...")
        try:
            self.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise ValueError(f"IP-Adapter weights do not fit this model: {err}") from err

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's weights in the published flat IP-Adapter-Plus layout."""
        proj = {k[len("image_proj.") :]: v for k, v in self.state_dict().items() if k.startswith("image_proj.")}
        state = {f"image_proj.{k}": v for k, v in resampler_state_to_published(proj).items()}
        for key_id, proc in zip(self.config.key_ids, self.attn_processors):
            state[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            state[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return {k: v.detach().contiguous() for k, v in state.items()}

    # -- save / load (called by DiffusionPipeline.save_pretrained / from_pretrained) ---------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write `config.json` and the published-layout safetensors (temp name, then rename)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        tmp = folder / f".{ADAPTER_WEIGHT_NAME}.tmp"
        save_file(self.published_state_dict(), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / ADAPTER_WEIGHT_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> AssignAdapter:
        """Load a folder written by `save_pretrained` (local, or a hub repo with `subfolder=`).

        Raises:
            FileNotFoundError: no config.json / weight file there.
        """
        subfolder = kwargs.get("subfolder") or ""
        ref = os.fspath(pretrained_model_name_or_path)
        folder = Path(ref, subfolder)
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download

            for name in (cls.config_name, ADAPTER_WEIGHT_NAME):
                path = hf_hub_download(ref, name, subfolder=subfolder or None)
            folder = Path(path).parent
        weight = folder / ADAPTER_WEIGHT_NAME
        if not (folder / cls.config_name).is_file() or not weight.is_file():
            raise FileNotFoundError(f"{folder} is not an AssignAdapter folder (needs config.json and {ADAPTER_WEIGHT_NAME})")
        adapter = cls.from_config(cls.load_config(folder))
        adapter.load_published_state_dict(load_file(str(weight)))
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, dict):  # diffusers allows a per-component dtype map
            dtype = dtype.get("ip_adapter", dtype.get("default"))
        if dtype is not None:
            adapter = _to_like(adapter, adapter.device, dtype)
        return adapter.eval()

    # -- use --------------------------------------------------------------------------------
    def install(self, unet: UNet2DConditionModel) -> None:
        """Put this adapter's decoupled cross-attention processors on `unet`'s attn2 layers (other layers kept).

        Raises:
            ValueError: `unet` does not have exactly the attn2 layers this adapter was built for.
        """
        names = [name for name, _, _ in _cross_attention_layers(unet)]
        if names != list(self.config.layers):
            raise ValueError(
                f"AssignAdapter was built for attn2 layers {list(self.config.layers)[:3]}..., "
                f"this UNet has {names[:3]}...; they must match"
            )
        procs = dict(unet.attn_processors)
        for name, proc in zip(names, self.attn_processors):
            procs[f"{name}.processor"] = proc
        unet.set_attn_processor(procs)

    def set_scale(self, beta: float) -> None:
        """Set beta (Eq. 7) on every decoupled cross-attention layer; 0 skips the image branch entirely."""
        for proc in self.attn_processors:
            proc.scale = [float(beta)]


DETAIL_MLP = "mlp"
DETAIL_LINEAR = "linear"
# Which CLIP hidden states feed the detail encoder: lar-gen's own (penultimate layer, CLS dropped),
# or the official SDXL release's `patch_projector` input (last layer, CLS kept).
DETAIL_PENULTIMATE_PATCHES = "penultimate_patches"
DETAIL_LAST_ALL = "last_all"


class DetailEncoder(ModelMixin, ConfigMixin):
    """Refine's detail encoder (Eq. 8): CLIP patch features to RefineNet's cross-attention context.

    `kind="mlp"` (lar-gen's, trained in stage 2): Linear-GELU-Linear + LayerNorm. `kind="linear"`:
    one Linear, the official SDXL release's `patch_projector` (`inference.official`). `features`
    says which CLIP hidden states it reads (`LARGenModel.encode_subject`).
    """

    @register_to_config
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        kind: str = DETAIL_MLP,
        features: str = DETAIL_PENULTIMATE_PATCHES,
    ) -> None:
        super().__init__()
        if kind not in (DETAIL_MLP, DETAIL_LINEAR):
            raise ValueError(f"DetailEncoder kind must be {DETAIL_MLP!r} or {DETAIL_LINEAR!r}, got {kind!r}")
        if features not in (DETAIL_PENULTIMATE_PATCHES, DETAIL_LAST_ALL):
            raise ValueError(f"DetailEncoder features must be {DETAIL_PENULTIMATE_PATCHES!r} or {DETAIL_LAST_ALL!r}, got {features!r}")
        if kind == DETAIL_LINEAR:
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            hidden = hidden_dim or max(in_dim, out_dim)
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """[B, N, in_dim] CLIP patch features -> [B, N, out_dim] detail tokens."""
        if self.config.kind == DETAIL_LINEAR:
            return self.proj(patch_features)
        return self.norm(self.mlp(patch_features))


def refinenet_from_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A 4-channel-input copy of the main UNet: same config (in_channels=4), weights copied.

    `conv_in` keeps the main UNet's first 4 input channels (the noisy-latent ones); every other
    weight is copied as is. Attention processors are diffusers' defaults (no IP-Adapter).

    Raises:
        ValueError: `unet` has fewer than 4 input channels.
    """
    if unet.config.in_channels < 4:
        raise ValueError(f"refinenet_from_unet: the UNet has {unet.config.in_channels} input channels, need >= 4")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config.update(in_channels=4, encoder_hid_dim_type=None, encoder_hid_dim=None)
    refinenet = UNet2DConditionModel.from_config(config)
    state = {
        k: v
        for k, v in unet.state_dict().items()
        if ".processor." not in k and not k.startswith("encoder_hid_proj.")
    }
    state["conv_in.weight"] = state["conv_in.weight"][:, :4].clone()
    refinenet.load_state_dict(state, strict=True)
    refinenet.set_attn_processor(AttnProcessor2_0())
    return _to_like(refinenet, unet.device, unet.dtype)


@contextmanager
def plain_attention(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """Temporarily give `unet` diffusers' default processors (so its state dict is a plain UNet's)."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)


_DECODER_ATTENTION = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn(\d+)(?:\.|$)")


def _decoder_position(name: str) -> tuple[int, ...] | None:
    """Execution order key (block, attention, transformer block, attn1|attn2) of a decoder attention layer/param."""
    match = _DECODER_ATTENTION.match(name)
    return tuple(int(g) for g in match.groups()) if match else None


def _runs_before(name: str, last: tuple[int, ...]) -> bool:
    """Whether the attention layer owning parameter `name` runs before the decoder layer at position `last`.

    `UNet2DConditionModel` runs its encoder and mid block before any decoder block, decoder blocks in
    index order, and within a transformer block attn1 before attn2; everything that runs earlier
    feeds the later hidden states (the UNet is one chain plus skip connections).
    """
    position = _decoder_position(name)
    return position is None or position < last


def _cast_added(added: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    return None if added is None else {k: v.to(dtype) for k, v in added.items()}


class LARGenModel(nn.Module):
    """Locate + Assign (+ Refine): the denoiser shared by `LARGenPipeline` and the trainer.

    Args:
        unet: the main 9-channel inpainting UNet (a plain `UNet2DConditionModel`).
        ip_adapter: Assign's weights; installed on `unet`'s attn2 layers here.
        image_encoder: CLIPVisionModelWithProjection; frozen.
        refinenet: optional RefineNet (`refinenet_from_unet`); connected to `unet` here.
        detail_encoder: optional `DetailEncoder`, required with `refinenet`.

    Raises:
        ValueError: the UNet is not 9-channel, or RefineNet comes without a detail encoder.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        ip_adapter: AssignAdapter,
        image_encoder: nn.Module,
        refinenet: UNet2DConditionModel | None = None,
        detail_encoder: DetailEncoder | None = None,
    ) -> None:
        super().__init__()
        if unet.config.in_channels != 9:
            raise ValueError(f"LARGenModel: the main UNet must take 9 channels [z; m; z_s], has {unet.config.in_channels}")
        ip_adapter.install(unet)
        self.unet = unet
        self.ip_adapter = ip_adapter
        self.image_encoder = image_encoder.requires_grad_(False)
        self.refinenet: UNet2DConditionModel | None = None
        self.detail_encoder: DetailEncoder | None = None
        self.bank: RefineBank | None = None
        if refinenet is not None or detail_encoder is not None:
            if refinenet is None or detail_encoder is None:
                raise ValueError("LARGenModel: RefineNet and the detail encoder come together (give both or neither)")
            self._connect_refine(refinenet, detail_encoder)
        self.beta = 1.0

    # -- construction -----------------------------------------------------------------------
    def _connect_refine(self, refinenet: UNet2DConditionModel, detail_encoder: DetailEncoder) -> None:
        if refinenet.config.in_channels != 4:
            raise ValueError(f"RefineNet must take 4 channels (the noised subject latent), has {refinenet.config.in_channels}")
        if detail_encoder.config.out_dim != refinenet.config.cross_attention_dim:
            raise ValueError(
                f"DetailEncoder outputs {detail_encoder.config.out_dim} channels, RefineNet cross-attends to "
                f"{refinenet.config.cross_attention_dim}"
            )
        self.refinenet = refinenet
        self.detail_encoder = detail_encoder
        self.bank = install_refine(self.unet, refinenet)
        self._refine_layers = decoder_self_attention_layers(refinenet)

    def add_refine(
        self, refinenet: UNet2DConditionModel | None = None, detail_encoder: DetailEncoder | None = None, seed: int = 0
    ) -> None:
        """Attach Refine (stage 2): RefineNet (default: copied from the main UNet) and a detail encoder (default: new).

        Raises:
            ValueError: Refine is already attached.
        """
        if self.refinenet is not None:
            raise ValueError("LARGenModel already has a RefineNet")
        refinenet = refinenet if refinenet is not None else refinenet_from_unet(self.unet)
        if detail_encoder is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                detail_encoder = DetailEncoder(
                    in_dim=self.image_encoder.config.hidden_size, out_dim=refinenet.config.cross_attention_dim
                )
            detail_encoder = _to_like(detail_encoder, self.unet.device, self.unet.dtype)
        self._connect_refine(refinenet, detail_encoder)

    @classmethod
    def from_pipeline(cls, pipe) -> LARGenModel:
        """The model inside a `LARGenPipeline` (the same modules, not a copy)."""
        return pipe.model

    @property
    def image_proj(self) -> IPAdapterPlusImageProjection:
        """The IP-Adapter-Plus resampler (frozen in both training stages)."""
        return self.ip_adapter.image_proj

    @property
    def has_refine(self) -> bool:
        return self.refinenet is not None

    def optimize(self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None,
                 compile_backend: str = "inductor") -> LARGenModel:
        """Speed options of the denoisers (main UNet, RefineNet), shared by the pipeline and the trainer.

        Attention needs no option: every processor (diffusers' `*2_0` ones and Refine's) calls
        PyTorch's SDPA, which picks the flash / memory-efficient kernel on a GPU by itself.

        Args:
            channels_last: convolution weights in channels-last memory format (faster convolutions
                on tensor-core GPUs; the same results within float rounding).
            compile: `torch.compile` each denoiser in place (`nn.Module.compile`: parameter names
                and checkpoints are unchanged); the first calls compile, which takes minutes at
                full size.
            compile_mode, compile_backend: `torch.compile`'s `mode` and `backend`.

        Returns:
            self.
        """
        for net in (self.unet, self.refinenet):
            if net is None:
                continue
            if channels_last:
                net.to(memory_format=torch.channels_last)
            if compile:
                net.compile(mode=compile_mode, backend=compile_backend)
        return self

    # -- conditions -------------------------------------------------------------------------
    def _clip_hidden(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels.to(device=self.image_encoder.device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    def encode_subject(self, clip_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP-normalised subject pixels [B,3,S,S] -> (image tokens [B,16,D], detail tokens [B,N,D'] or None).

        Image tokens: penultimate CLIP hidden states through the resampler (Eq. 4). Detail tokens:
        the same hidden states' patch tokens (CLS dropped) through the DetailEncoder (Eq. 8); None
        without a detail encoder.
        """
        pixels = clip_pixels.to(device=self.image_encoder.device, dtype=self.image_encoder.dtype)
        states = self.image_encoder(pixels, output_hidden_states=True).hidden_states
        hidden = states[-2]
        proj_dtype = self.image_proj.latents.dtype
        image_embeds = self.image_proj(hidden.to(proj_dtype))
        detail = None
        if self.detail_encoder is not None:
            if self.detail_encoder.config.get("features", DETAIL_PENULTIMATE_PATCHES) == DETAIL_LAST_ALL:
                features = states[-1]  # = CLIP's last_hidden_state (before post_layernorm), CLS kept
            else:
                features = hidden[:, 1:]
            detail = self.detail_encoder(features.to(self.detail_encoder.dtype))
        return image_embeds, detail

    def null_image_embeds(self, batch_size: int) -> torch.Tensor:
        """THE null image condition [B,16,D]: the resampler applied to CLIP's encoding of an all-zero image.

        This is how IP-Adapter-Plus was trained to drop the image (zeroed, normalised CLIP input),
        so the published weights and our trainer's image dropout agree; the pipeline's text-only and
        unconditional branches use exactly this.
        """
        size = self.image_encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size, device=self.image_encoder.device, dtype=self.image_encoder.dtype)
        embeds = self.image_proj(self._clip_hidden(zeros).to(self.image_proj.latents.dtype))
        return embeds.repeat(batch_size, 1, 1)

    def set_beta(self, beta: float) -> None:
        """Default Assign strength for `forward` calls that pass `beta=None`."""
        self.beta = float(beta)

    def trainable_parameters(self, stage: Literal[1, 2]) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of exactly what a training stage updates (names as in `named_parameters()`).

        Stage 1: every main-UNet parameter, `to_k_ip`/`to_v_ip` included (they live in the UNet's
        attn2 processors); resampler and image encoder frozen. Stage 2: DetailEncoder parameters
        and the RefineNet cross-attention (`attn2`) layers that can reach the main UNet, i.e. those
        that run before the last captured decoder self-attention input. Later ones (the attn2 of
        the last captured transformer block, and any after it) cannot affect the output, since the
        RefineNet pass stops there; they are left out, so every returned parameter gets a gradient
        (no DDP `find_unused_parameters`).

        Raises:
            ValueError: unknown stage, or stage 2 without Refine attached (or with no decoder
                self-attention layer to capture, so nothing in RefineNet could be trained).
        """
        if stage == 1:
            return [(f"unet.{n}", p) for n, p in self.unet.named_parameters()]
        if stage == 2:
            if self.refinenet is None or self.detail_encoder is None:
                raise ValueError("stage 2 trains RefineNet: call add_refine() first")
            if not self._refine_layers:
                raise ValueError("stage 2: RefineNet has no decoder self-attention layer, so nothing of it reaches the main UNet")
            last = _decoder_position(self._refine_layers[-1])
            params = [
                (f"refinenet.{n}", p)
                for n, p in self.refinenet.named_parameters()
                if ".attn2." in n and _runs_before(n, last)
            ]
            params += [(f"detail_encoder.{n}", p) for n, p in self.detail_encoder.named_parameters()]
            return params
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")

    # -- denoising --------------------------------------------------------------------------
    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor,
        masked_image_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        image_embeds: torch.Tensor | None,
        beta: float | None = None,
        refine_latents: torch.Tensor | None = None,
        detail_embeds: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        refine_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the noise of `noisy_latents` (Eq. 11's epsilon_theta).

        Args:
            noisy_latents: [B,4,h,w] z_t.
            timesteps: [B] or scalar.
            mask: [B,1,h,w] m* (1 = inpaint).
            masked_image_latents: [B,4,h,w] z_s = Enc(x_s * (1 - m)).
            text_embeds: [B,77,D] text encoder hidden states ("" tokens for the null text).
            image_embeds: [B,16,D] resampler tokens; None = `null_image_embeds(B)`.
            beta: Assign strength (Eq. 7); None = `self.beta`.
            refine_latents: [B',4,h',w'] the subject latent noised to the same t, B' dividing B
                (features are tiled in blocks of B'); None = Refine off.
            detail_embeds: [B',N,D'] detail tokens, required with `refine_latents`.
            added_cond_kwargs: SDXL's added conditions for the main UNet (`text_embeds` [B,P]
                pooled text, `time_ids` [B,6]); None for SD-1.5 UNets.
            refine_added_cond_kwargs: the same for RefineNet, batch B' (`inference.sdxl`).

        Returns:
            [B,4,h,w] predicted noise.

        Raises:
            ValueError: inconsistent shapes, or Refine inputs without a RefineNet / detail tokens.
        """
        batch = noisy_latents.shape[0]
        for name, t, channels in (("mask", mask, 1), ("masked_image_latents", masked_image_latents, 4)):
            if t.shape[0] != batch or t.shape[1] != channels or t.shape[2:] != noisy_latents.shape[2:]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{batch},{channels},{noisy_latents.shape[2]},{noisy_latents.shape[3]}]")
        if image_embeds is None:
            image_embeds = self.null_image_embeds(batch)
        if image_embeds.ndim != 3 or image_embeds.shape[0] != batch:
            raise ValueError(f"image_embeds must be [{batch}, tokens, dim], got {tuple(image_embeds.shape)}")
        self.ip_adapter.set_scale(self.beta if beta is None else beta)
        # conv_in's dtype, not `ModelMixin.dtype`: that walks every module on each call (~0.5% of a step).
        dtype = self.unet.conv_in.weight.dtype
        sample = torch.cat([noisy_latents, mask, masked_image_latents], dim=1).to(dtype)
        context = (text_embeds.to(dtype), [image_embeds.to(dtype)])

        use_refine = refine_latents is not None
        if use_refine:
            if self.refinenet is None or self.bank is None:
                raise ValueError("refine_latents given, but this model has no RefineNet (add_refine())")
            if detail_embeds is None:
                raise ValueError("refine_latents need detail_embeds (encode_subject's second output)")
            ref_batch = refine_latents.shape[0]
            if batch % ref_batch != 0 or detail_embeds.shape[0] != ref_batch:
                raise ValueError(
                    f"refine_latents batch {ref_batch} must divide the main batch {batch} and equal "
                    f"detail_embeds' batch {detail_embeds.shape[0]}"
                )
            ref_t = timesteps
            if torch.is_tensor(timesteps) and timesteps.ndim == 1 and timesteps.shape[0] != ref_batch:
                ref_t = timesteps[:ref_batch]
            self.bank.clear()
            # RefineNet's own prediction is unused: only its decoder self-attention inputs matter, so
            # the pass stops once the last of them is stored (the skipped tail cannot affect them).
            self.bank.stop_after = self._refine_layers[-1] if self._refine_layers else None
            try:
                ref_dtype = self.refinenet.conv_in.weight.dtype
                self.refinenet(
                    refine_latents.to(ref_dtype), ref_t, encoder_hidden_states=detail_embeds.to(ref_dtype),
                    added_cond_kwargs=_cast_added(refine_added_cond_kwargs, ref_dtype),
                )
            except RefineCaptured:
                pass
            finally:
                self.bank.stop_after = None
            missing = [n for n in self._refine_layers if n not in self.bank.features]
            if missing:
                raise RuntimeError(f"RefineNet pass did not reach layers {missing}")
        try:
            return self.unet(
                sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=_cast_added(added_cond_kwargs, dtype)
            ).sample
        finally:
            if self.bank is not None:
                self.bank.clear()
