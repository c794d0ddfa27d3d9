"""The official LAR-Gen release (scepter, SDXL) -> lar-gen: key layout at full size, numerics at tiny size, CLI.

Full size: a state dict with exactly the official keys and shapes (built on the meta device, no
weights) converts with nothing missing, nothing unexpected and every shape matching. Tiny size: a
self-written reference of the official `LargenUNetXL` (its `att_v2` blocks: text and image
attention summed with the image scale, the refine branch's decoder self-attention inputs as extra
keys/values) in the official key layout; its state dict, converted, must give the same output as
the reference forward.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from inference import cli
from inference.model import AssignAdapter, DetailEncoder, LARGenModel, _cross_attention_layers
from inference.official import (
    EMBEDDER_PREFIX,
    OFFICIAL_DEFAULTS,
    UNET_PREFIX,
    _diffusers_config,
    convert_official,
    published_adapter_state,
    split_official_state_dict,
)

KEYS_GZ = Path(__file__).resolve().parents[1] / "fixtures" / "scepter-largen-sdxl-keys.txt.gz"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "scepter-largen-sdxl-keys.json"
SHARED_SHA256 = "988d771ffc2b64c61f6dd1e551709fd6053192642ff2db6ce9005367ca080219"
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, projection_dim=1024)


# ----------------------------------------------------------------------------- the key list


def _official_layout() -> dict[str, tuple[int, ...]]:
    """key -> shape of the official UNet (with its refine branch) and IP-Adapter-Plus embedder."""
    layout = {}
    for line in gzip.decompress(KEYS_GZ.read_bytes()).decode().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        assert dtype == "float32"
        layout[key] = tuple(int(v) for v in shape.split(",")) if shape else ()
    return layout


@pytest.fixture(scope="module")
def layout():
    return _official_layout()


def test_shipped_key_list_is_the_shared_fixtures(layout):
    assert len(layout) == 3636 + 51 + 2 + 520
    assert sum(k.startswith(UNET_PREFIX + "ref_") for k in layout) == 1816
    if not SHARED.is_file():  # a clean clone without ../shared: the shipped list is the reference
        return
    raw = SHARED.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SHARED_SHA256
    fixture = json.loads(raw)
    entries = fixture["unet_use_refine_true"] + [e for part in fixture["ip_adapter_plus_embedder"].values() for e in part]
    assert {e["key"]: tuple(e["shape"]) for e in entries} == layout


@pytest.mark.parametrize("refine", [False, True], ids=["official", "with-refine-branch"])
def test_full_size_official_keys_convert_with_nothing_missing_or_unexpected(layout, refine):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    state = {
        k: torch.empty(shape, device="meta")
        for k, shape in layout.items()
        if refine or not k.startswith(UNET_PREFIX + "ref_")
    }
    parts = split_official_state_dict(state)
    assert parts.ignored == []

    def check(module, converted):
        own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert sorted(set(own) - set(got)) == []  # missing
        assert sorted(set(got) - set(own)) == []  # unexpected
        assert [k for k in own if own[k] != got[k]] == []

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_diffusers_config(parts.unet_config))
        adapter_state = published_adapter_state(parts, unet)
        # The real loader: strict keys and shapes, resampler heads and depth read off the weights.
        adapter = AssignAdapter.from_published(adapter_state, unet)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    check(unet, parts.unet)
    assert unet.config.in_channels == 9 and unet.config.cross_attention_dim == 2048
    assert len(parts.ip_kv) == 70  # every attn2 of the 2.6B UNet carries the image-prompt k/v
    assert adapter.config.resampler_heads == 20 and adapter.config.image_embed_dim == 1280
    published = {k: tuple(v.shape) for k, v in adapter.published_state_dict().items()}
    assert published == {k: tuple(v.shape) for k, v in adapter_state.items()}
    check(encoder, parts.image_encoder)
    used = len(parts.unet) + 2 * len(parts.ip_kv) + len(parts.resampler) + len(parts.detail) + len(parts.image_encoder)
    if refine:
        with torch.device("meta"):
            refinenet = UNet2DConditionModel.from_config(_diffusers_config(parts.refinenet_config))
            detail = DetailEncoder(in_dim=1280, out_dim=2048, kind="linear", features="last_all")
        check(refinenet, parts.refinenet)
        check(detail, parts.detail)
        assert refinenet.config.in_channels == 4
        # Dropped: exactly the refine branch's image-prompt k/v (it never receives image tokens).
        assert parts.dropped == sorted(k for k in layout if k.startswith(UNET_PREFIX + "ref_") and "_ip." in k)
        used += len(parts.refinenet) - 4 + len(parts.dropped)  # -4: the head it borrows from the main UNet
    else:
        assert parts.refinenet is None and parts.dropped == []
    assert used == len(state)  # every official key landed in exactly one place


# ----------------------------------------------------------------------------- the reference


def _sdpa(q, k, v, heads):
    b, n, c = q.shape
    split = [t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)


class _Attention(nn.Module):
    """Official MemoryEfficientCrossAttention / XFormersMHA_IP (with_ip)."""

    def __init__(self, dim, context_dim, heads, with_ip):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        if with_ip:
            self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
            self.to_v_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, scale=None, num_img_token=None):
        q = self.to_q(x)
        context = x if context is None else context
        if scale is not None and num_img_token is not None:
            text, image = context[:, :-num_img_token], context[:, -num_img_token:]
            out = _sdpa(q, self.to_k(text), self.to_v(text), self.heads)
            out = out + scale * _sdpa(q, self.to_k_ip(image), self.to_v_ip(image), self.heads)
        else:
            out = _sdpa(q, self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class _GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(_GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class _TransformerBlockV2(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1 = _Attention(dim, dim, heads, with_ip=False)
        self.ff = _FeedForward(dim)
        self.attn2 = _Attention(dim, context_dim, heads, with_ip=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, caching=None, cache=None, scale=None, num_img_token=None):
        y = self.norm1(x)
        if caching == "write":
            cache.append(y)
            x = self.attn1(y) + x
        elif caching == "read":
            x = self.attn1(y, context=torch.cat([y, cache.pop(0)], dim=1)) + x
        else:
            x = self.attn1(y) + x
        x = self.attn2(self.norm2(x), context, scale, num_img_token) + x
        return self.ff(self.norm3(x)) + x


class _SpatialTransformerV2(nn.Module):
    def __init__(self, ch, heads, depth, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch)  # official: normalization() = GroupNorm32, eps 1e-5
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(_TransformerBlockV2(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context, **kwargs):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            t = block(t, context, **kwargs)
        return self.proj_out(t).transpose(1, 2).reshape(b, c, h, w) + x


class _ResBlock(nn.Module):
    def __init__(self, ch, emb, out):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class _Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Sequential(nn.Sequential):
    def forward(self, x, emb, context, **kwargs):
        for layer in self:
            if isinstance(layer, _ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, _SpatialTransformerV2):
                x = layer(x, context, **kwargs)
            else:
                x = layer(x)
        return x


def _sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _LargenUNetXL(nn.Module):
    """The official LargenUNetXL's structure and forward (att_v2, sequential label embedding), at any size."""

    def __init__(self, mc=32, mult=(1, 4), nres=1, attention=(False, True), depth=(1, 2), context_dim=64,
                 adm=80, head_channels=64, refine=False):
        super().__init__()
        self.mc = mc
        emb = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([_Sequential(nn.Conv2d(9, mc, 3, padding=1))])
        chans, ch = [mc], mc
        for level, m in enumerate(mult):
            for _ in range(nres):
                layers = [_ResBlock(ch, emb, m * mc)]
                ch = m * mc
                if attention[level]:
                    layers.append(_SpatialTransformerV2(ch, ch // head_channels, depth[level], context_dim))
                self.input_blocks.append(_Sequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(_Sequential(_Downsample(ch)))
                chans.append(ch)
        self.middle_block = _Sequential(
            _ResBlock(ch, emb, ch), _SpatialTransformerV2(ch, ch // head_channels, depth[-1], context_dim),
            _ResBlock(ch, emb, ch),
        )
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nres + 1):
                layers = [_ResBlock(ch + chans.pop(), emb, m * mc)]
                ch = m * mc
                if attention[level]:
                    layers.append(_SpatialTransformerV2(ch, ch // head_channels, depth[level], context_dim))
                if level and i == nres:
                    layers.append(_Upsample(ch))
                self.output_blocks.append(_Sequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, 4, 3, padding=1))
        self.use_refine = refine
        if refine:
            self.ref_time_embed = copy.deepcopy(self.time_embed)
            self.ref_label_emb = copy.deepcopy(self.label_emb)
            self.ref_input_blocks = copy.deepcopy(self.input_blocks)
            self.ref_input_blocks[0] = _Sequential(nn.Conv2d(4, mc, 3, padding=1))
            self.ref_middle_block = copy.deepcopy(self.middle_block)
            self.ref_output_blocks = copy.deepcopy(self.output_blocks)

    def forward(self, x, t, y, context, img_context=None, image_scale=None, ref=None, ref_context=None, null_y=None):
        t_emb = _sinusoid(t, self.mc)
        emb = self.time_embed(t_emb) + self.label_emb(y)
        kw = {}
        if img_context is not None:  # a subject task: text and image tokens share the context
            kw = {"scale": image_scale, "num_img_token": img_context.shape[1]}
            context = torch.cat([context, img_context], dim=1)
        hs, h = [], x
        if not self.use_refine:
            for module in self.input_blocks:
                h = module(h, emb, context, **kw)
                hs.append(h)
            h = self.middle_block(h, emb, context, **kw)
            for module in self.output_blocks:
                h = module(torch.cat([h, hs.pop()], dim=1), emb, context, **kw)
            return self.out(h)
        ref_y = y.clone()
        ref_y[:, : null_y.shape[1]] = null_y
        ref_emb = self.ref_time_embed(t_emb) + self.ref_label_emb(ref_y)
        refs = []
        for ref_module, module in zip(self.ref_input_blocks, self.input_blocks):
            ref = ref_module(ref, ref_emb, ref_context)
            h = module(h, emb, context, **kw)
            refs.append(ref)
            hs.append(h)
        ref = self.ref_middle_block(ref, ref_emb, ref_context)
        h = self.middle_block(h, emb, context, **kw)
        for ref_module, module in zip(self.ref_output_blocks, self.output_blocks):
            cache = []
            ref = ref_module(torch.cat([ref, refs.pop()], dim=1), ref_emb, ref_context, caching="write", cache=cache)
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context, caching="read", cache=cache, **kw)
        return self.out(h)


TIME_DIM, POOLED, CONTEXT, CLIP_HIDDEN = 8, 32, 64, 32  # the tiny SDXL zoo's sizes


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    # Official init zeroes proj_out and the head; random everything so that no path hides.
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if id(p) in norms else 0.0))
    return model


def _tiny_official_state(refine: bool) -> tuple[_LargenUNetXL, dict[str, torch.Tensor]]:
    from inference.tiny_models import ip_adapter_sdxl_state_dict

    unet = _randomised(_LargenUNetXL(adm=POOLED + 6 * TIME_DIM, context_dim=CONTEXT, refine=refine), seed=1).eval()
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    proj = ip_adapter_sdxl_state_dict()
    state |= {EMBEDDER_PREFIX + "image_proj_model." + k[len("image_proj."):]: v for k, v in proj.items() if k.startswith("image_proj.")}
    gen = torch.Generator().manual_seed(2)
    state[EMBEDDER_PREFIX + "patch_projector.weight"] = torch.randn(CONTEXT, CLIP_HIDDEN, generator=gen) * 0.2
    state[EMBEDDER_PREFIX + "patch_projector.bias"] = torch.randn(CONTEXT, generator=gen) * 0.05
    return unet, state


def _converted_model(state: dict[str, torch.Tensor]) -> LARGenModel:
    from diffusers import UNet2DConditionModel

    parts = split_official_state_dict(state, sample_size=8, addition_time_embed_dim=TIME_DIM)
    unet = UNet2DConditionModel.from_config(_diffusers_config(parts.unet_config))
    unet.load_state_dict(parts.unet, strict=True)
    adapter = AssignAdapter.from_published(published_adapter_state(parts, unet), unet)
    refinenet = detail = None
    if parts.refinenet is not None:
        refinenet = UNet2DConditionModel.from_config(_diffusers_config(parts.refinenet_config))
        refinenet.load_state_dict(parts.refinenet, strict=True)
        detail = DetailEncoder(CLIP_HIDDEN, CONTEXT, kind="linear", features="last_all")
        detail.load_state_dict(parts.detail)
    encoder = nn.Module()  # the image tokens are given directly here; LARGenModel only stores it
    return LARGenModel(unet.eval(), adapter, encoder, refinenet, detail)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(3)
    b = 2
    ids = torch.tensor([[1024.0, 768.0, 16.0, 40.0, 1024.0, 1024.0]]).repeat(b, 1)
    return {
        "z": torch.randn(b, 4, 8, 8, generator=gen),
        "mask": (torch.rand(b, 1, 8, 8, generator=gen) > 0.5).float(),
        "masked": torch.randn(b, 4, 8, 8, generator=gen),
        "t": torch.tensor([901, 37]),
        "text": torch.randn(b, 7, CONTEXT, generator=gen),
        "image": torch.randn(b, 16, CONTEXT, generator=gen),
        "pooled": torch.randn(b, POOLED, generator=gen),
        "null_pooled": torch.randn(1, POOLED, generator=gen),
        "ids": ids,
        "ref": torch.randn(1, 4, 8, 8, generator=gen),
        "detail": torch.randn(1, 5, CONTEXT, generator=gen),
    }


def _y(pooled, ids):
    return torch.cat([pooled, _sinusoid(ids.flatten(), TIME_DIM).reshape(ids.shape[0], -1)], dim=1)


@pytest.mark.parametrize("task", ["text", "subject"])
def test_tiny_official_unet_converts_to_the_same_outputs(inputs, task):
    reference, state = _tiny_official_state(refine=False)
    model = _converted_model(state)
    x = torch.cat([inputs["z"], inputs["mask"], inputs["masked"]], dim=1)
    scale = 0.7
    with torch.no_grad():
        expected = reference(
            x, inputs["t"], _y(inputs["pooled"], inputs["ids"]), inputs["text"],
            img_context=inputs["image"] if task == "subject" else None, image_scale=scale,
        )
        got = model(
            inputs["z"], inputs["t"], inputs["mask"], inputs["masked"], inputs["text"], inputs["image"],
            # A text task passes no image tokens: beta 0 skips the image branch entirely.
            beta=scale if task == "subject" else 0.0,
            added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["ids"]},
        )
    assert expected.abs().mean() > 0.1
    # Float32 rounding plus one known difference: the official transformer GroupNorm eps is 1e-5, diffusers' 1e-6.
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-5 * expected.abs().max().item())


def test_tiny_official_refine_branch_converts_to_the_same_outputs(inputs):
    reference, state = _tiny_official_state(refine=True)
    model = _converted_model(state)
    x = torch.cat([inputs["z"], inputs["mask"], inputs["masked"]], dim=1)
    with torch.no_grad():
        expected = reference(
            x, inputs["t"][:1].repeat(2), _y(inputs["pooled"], inputs["ids"]), inputs["text"], img_context=inputs["image"],
            image_scale=1.0, ref=inputs["ref"].repeat(2, 1, 1, 1), ref_context=inputs["detail"].repeat(2, 1, 1),
            null_y=inputs["null_pooled"].repeat(2, 1),
        )
        got = model(
            inputs["z"], inputs["t"][:1].repeat(2), inputs["mask"], inputs["masked"], inputs["text"], inputs["image"],
            beta=1.0, refine_latents=inputs["ref"], detail_embeds=inputs["detail"],
            added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["ids"]},
            refine_added_cond_kwargs={"text_embeds": inputs["null_pooled"], "time_ids": inputs["ids"][:1]},
        )
        without = model(
            inputs["z"], inputs["t"][:1].repeat(2), inputs["mask"], inputs["masked"], inputs["text"], inputs["image"],
            beta=1.0, added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["ids"]},
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-5 * expected.abs().max().item())
    assert (got - without).abs().max() > 1e-2  # the refine features do reach the output


# ----------------------------------------------------------------------------- convert + inpaint, the CLI


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint in the official file layout (`{"model": state}`), refine branch included."""
    _, state = _tiny_official_state(refine=True)
    path = tmp_path_factory.mktemp("official") / "largen_ckpt_tiny.pth"
    torch.save({"model": state}, path)
    return path


def _bases(tiny_zoo: Path) -> list[str]:
    return ["--base", str(tiny_zoo / "sdxl-inpainting"), "--image-prompt", str(tiny_zoo / "ip-adapter-sdxl")]


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert err.count("\n") == 1 and err.startswith(("largen: error: ", "largen convert-official: error: ")), err
    assert "Traceback" not in err
    return err


def test_convert_official_then_inpaint_with_the_official_defaults(tiny_zoo, official_ckpt, tmp_path, capsys):
    out = tmp_path / "largen-official"
    assert cli.main(["convert-official", str(official_ckpt), str(out), *_bases(tiny_zoo)]) == 0
    assert "wrote" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LARGenXLPipeline"
    assert {k: index[k] for k in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    assert json.loads((out / "detail_encoder" / "config.json").read_text())["kind"] == "linear"

    from safetensors import safe_open

    from inference.sdxl import load_largen_pipeline

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16  # --dtype default
    pipe = load_largen_pipeline(out, torch_dtype=torch.float16)
    state = torch.load(official_ckpt, weights_only=True)["model"]
    torch.testing.assert_close(pipe.unet.conv_in.weight, state[UNET_PREFIX + "input_blocks.0.0.weight"].half())
    torch.testing.assert_close(pipe.refinenet.conv_in.weight, state[UNET_PREFIX + "ref_input_blocks.0.0.weight"].half())
    layers = {name: key_id for name, key_id, _ in _cross_attention_layers(pipe.unet)}
    key_id = layers["down_blocks.1.attentions.0.transformer_blocks.1.attn2"]
    published = pipe.ip_adapter.published_state_dict()
    torch.testing.assert_close(
        published[f"ip_adapter.{key_id}.to_k_ip.weight"],
        state[UNET_PREFIX + "input_blocks.3.1.transformer_blocks.1.attn2.to_k_ip.weight"].half(),
    )
    assert pipe.default_beta("text") == 0.0 and pipe.default_guidance_rescale == 0.5

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    subject = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(subject).save(tmp_path / "subject.png")
    code = cli.main([
        "inpaint", "--image", str(tmp_path / "scene.png"), "--box", "10,10,30,30", "--prompt", "a red dog",
        "--subject", str(tmp_path / "subject.png"), "--steps", "2", "--model", str(out), "--out", str(tmp_path / "o.png"),
    ])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "o.png").size == (50, 40)


def test_resampler_from_the_official_ip_adapter_bin_when_the_checkpoint_lacks_it(tiny_zoo, official_ckpt, tmp_path):
    state = torch.load(official_ckpt, weights_only=True)["model"]
    prefix = EMBEDDER_PREFIX + "image_proj_model."
    resampler = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    without = _save(tmp_path / "no-resampler.pth", {k: v for k, v in state.items() if not k.startswith(prefix)})
    # The official ip-adapter-plus_sdxl_vit-h.bin layout: nested {"image_proj": ..., "ip_adapter": ...}.
    ip_bin = _save(tmp_path / "ip-adapter-plus_sdxl_vit-h.bin", {"image_proj": resampler, "ip_adapter": {}})
    pipe = convert_official(
        without, tmp_path / "out", base=tiny_zoo / "sdxl-inpainting", image_prompt=tiny_zoo / "ip-adapter-sdxl",
        ip_adapter=ip_bin, torch_dtype=None,
    )
    torch.testing.assert_close(pipe.ip_adapter.image_proj.latents, resampler["latents"])
    assert (tmp_path / "out" / "model_index.json").is_file()


def _ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights in the LDM layout that SGM checkpoints store (`first_stage_model.*`)."""
    n = len(vae.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", key)
        key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in key:
            name = key.split("mid_block.attentions.0.")[1].rsplit(".", 1)[0]
            key = key.replace(f"mid_block.attentions.0.{name}", f"mid.attn_1.{attention[name]}")
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[key] = value
    return out


def test_a_vae_in_the_checkpoint_is_converted_and_vae_option_wins(tiny_zoo, official_ckpt, tmp_path):
    from diffusers import AutoencoderKL

    zoo_vae = AutoencoderKL.from_pretrained(tiny_zoo / "sdxl-inpainting", subfolder="vae")
    torch.manual_seed(5)
    own = AutoencoderKL.from_config(zoo_vae.config)  # freshly initialised: not the zoo's weights
    assert not torch.equal(own.encoder.conv_in.weight, zoo_vae.encoder.conv_in.weight)
    state = torch.load(official_ckpt, weights_only=True)["model"]
    state |= {"first_stage_model." + k: v for k, v in _ldm_vae_state(own).items()}
    bases = dict(base=tiny_zoo / "sdxl-inpainting", image_prompt=tiny_zoo / "ip-adapter-sdxl", torch_dtype=None)
    pipe = convert_official(state, tmp_path / "a", **bases)
    for key, value in own.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[key], value, msg=key)
    pipe = convert_official(state, tmp_path / "b", vae=tiny_zoo / "sdxl-inpainting" / "vae", **bases)
    torch.testing.assert_close(pipe.vae.encoder.conv_in.weight, zoo_vae.encoder.conv_in.weight)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d, ck: [str(d / "nope.pth"), str(d / "out")], "does not exist"),
        (lambda d, ck: [str(d), str(d / "out")], "is not a file"),
        (lambda d, ck: [str(_write(d / "junk.pth", b"not a checkpoint")), str(d / "out")], "cannot read"),
        (lambda d, ck: [str(_save(d / "other.pth", {"weight": torch.zeros(2)})), str(d / "out")], "not an official LAR-Gen checkpoint"),
        (lambda d, ck: [str(_save(d / "list.pth", [1, 2])), str(d / "out")], "does not hold a state dict"),
        (lambda d, ck: [str(ck), str(_mkdir(d / "taken"))], "already exists"),
        (lambda d, ck: [str(ck), str(_write(d / "afile", b"x"))], "is not a folder"),
        (lambda d, ck: [str(ck), str(d / "missing" / "out")], "does not exist"),
        (lambda d, ck: [str(ck), str(d / "out"), "--ip-adapter", str(d / "none.bin")], "--ip-adapter"),
        (lambda d, ck: [str(ck), str(d / "out"), "--dtype", "float64"], "--dtype"),
        (lambda d, ck: [str(_variant(d, ck, drop="label_emb.0.2.bias")), str(d / "out")], "label_emb.0.2.bias"),
        (lambda d, ck: [str(_variant(d, ck, drop="attn2.to_v_ip")), str(d / "out")], "to_k_ip/to_v_ip"),
        (lambda d, ck: [str(_variant(d, ck, drop="patch_projector")), str(d / "out")], "patch_projector"),
        (lambda d, ck: [str(_variant(d, ck, shrink="image_proj_model.proj_out.weight")), str(d / "out")], "proj"),
    ],
    ids=["missing", "folder", "garbage", "other-model", "not-a-dict", "out-exists", "out-is-file", "out-parent",
         "ip-adapter", "dtype", "truncated", "no-ip-pair", "refine-without-projector", "resampler-misfit"],
)
def test_convert_official_bad_input_is_one_line(tiny_zoo, official_ckpt, tmp_path, capsys, make, words):
    argv = ["convert-official", *make(tmp_path, official_ckpt), *_bases(tiny_zoo)]
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _one_line_error(capsys, cli.main(argv))
    assert words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not list(tmp_path.glob(".out*"))


def test_convert_official_unloadable_base_is_one_line(official_ckpt, tmp_path, capsys):
    argv = ["convert-official", str(official_ckpt), str(tmp_path / "out"), "--base", str(tmp_path / "no-base")]
    err = _one_line_error(capsys, cli.main(argv))
    assert "no-base" in err
    assert not (tmp_path / "out").exists()


def _variant(folder: Path, ckpt: Path, drop: str | None = None, shrink: str | None = None) -> Path:
    """A copy of the tiny official checkpoint with the keys containing `drop` removed, or `shrink` cut in half."""
    state = torch.load(ckpt, weights_only=True)["model"]
    state = {k: v for k, v in state.items() if drop is None or drop not in k}
    for key in [k for k in state if shrink and k.endswith(shrink)]:
        state[key] = state[key][: state[key].shape[0] // 2]
    return _save(folder / "variant.pth", {"model": state})


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
