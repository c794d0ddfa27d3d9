"""The RAM++ network (Huang et al., "Open-Set Image Tagging with Multi-Grained Text Supervision").

An image goes through a Swin encoder (transformers' `SwinModel`); its tokens, the average-pooled
token first, are projected to the label-embedding width. Every tag has several text-description
embeddings (`label_embed`, 51 per tag in the published model); the pooled image embedding weighs
them (softmax of a scaled cosine, `reweight_scale`) into one embedding per tag. Those tag
embeddings, projected to the head's width, are the queries of a two-layer BERT-style decoder
that only cross-attends to the image tokens (no self-attention, no word embeddings: the
"tagging head"), and a linear layer turns each query into the tag's logit.

Module names follow the published checkpoint's keys where transformers does not impose its own
(`image_proj`, `label_embed`, `reweight_scale`, `wordvec_proj`, `tagging_head.encoder.layer.N`,
`fc`); `dataengine.ram.checkpoint` maps the Swin keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from transformers import BertConfig, SwinConfig, SwinModel
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

# torchvision-style ImageNet normalisation, as the published model was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RamPlusConfig:
    """Sizes of a RAM++ model; `full()` is the published `ram_plus_swin_large_14m` (Swin-L, 384 px)."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    label_dim: int = 512  # CLIP text width of the description embeddings; also the image projection's
    num_tags: int = 4585
    descriptions_per_tag: int = 51
    hidden_size: int = 768
    num_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 3072
    threshold: float = 0.68  # for tags without a per-tag threshold

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        grid = self.image_size // self.patch_size
        last = grid // 2 ** (len(self.depths) - 1)
        # transformers' Swin builds its position tables for `window_size` and shrinks the window
        # only at run time, so a last stage smaller than the window would not run.
        if self.image_size % self.patch_size or last < self.window_size or last % self.window_size:
            raise ValueError(
                f"image_size {self.image_size} / patch {self.patch_size} gives a last-stage grid of {last}, "
                f"which must be a multiple of window_size {self.window_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @classmethod
    def full(cls) -> RamPlusConfig:
        """The published RAM++ (Swin-L 384, 4,585 tags x 51 descriptions)."""
        return cls()

    @classmethod
    def tiny(cls, num_tags: int = 12) -> RamPlusConfig:
        """A few-thousand-parameter model with the same structure (shifted windows included), for tests."""
        return cls(
            image_size=64, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=2,
            label_dim=16, num_tags=num_tags, descriptions_per_tag=3, hidden_size=32, num_attention_heads=4,
            intermediate_size=64,
        )  # fmt: skip

    @property
    def vision_width(self) -> int:
        """Width of the Swin encoder's output tokens (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RamPlusConfig:
        """The inverse of `to_dict`.

        Raises:
            ValueError: an unknown key (a config of another model or version), or inconsistent sizes.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RAM++ config keys: {', '.join(unknown)}")
        return cls(**data)

    def swin_config(self) -> SwinConfig:
        """The transformers config of the image encoder (upstream: no absolute positions, patch norm on)."""
        return SwinConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=3, embed_dim=self.embed_dim,
            depths=list(self.depths), num_heads=list(self.num_heads), window_size=self.window_size,
            mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-5,
        )  # fmt: skip

    def head_config(self) -> BertConfig:
        """The transformers config of the tagging head's layers (upstream's `q2l_config.json`)."""
        config = BertConfig(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            is_decoder=True, add_cross_attention=True,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        return config


class RamTaggingLayer(nn.Module):
    """One decoder layer of the tagging head: cross-attention to the image tokens, then the MLP.

    The tag queries never attend to each other (upstream drops BERT's self-attention, as Query2Label
    does); keys and values come from the image tokens at the label-embedding width.
    """

    def __init__(self, config: RamPlusConfig):
        super().__init__()
        bert = config.head_config()
        self.crossattention = BertAttention(bert, is_cross_attention=True)
        self.crossattention.self.key = nn.Linear(config.label_dim, config.hidden_size)
        self.crossattention.self.value = nn.Linear(config.label_dim, config.hidden_size)
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.crossattention(queries, encoder_hidden_states=image_tokens)
        return self.output(self.intermediate(attended), attended)


class _LayerStack(nn.Module):
    def __init__(self, config: RamPlusConfig):
        super().__init__()
        self.layer = nn.ModuleList(RamTaggingLayer(config) for _ in range(config.num_layers))


class RamTaggingHead(nn.Module):
    """The tagging head: tag queries → per-tag features, through `encoder.layer[i]` (upstream key names)."""

    def __init__(self, config: RamPlusConfig):
        super().__init__()
        self.encoder = _LayerStack(config)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_tokens)
        return queries


class RamPlus(nn.Module):
    """RAM++: images (normalised, `image_size` square) → one logit per tag."""

    def __init__(self, config: RamPlusConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = SwinModel(config.swin_config(), add_pooling_layer=True)
        self.image_proj = nn.Linear(config.vision_width, config.label_dim)
        self.label_embed = nn.Parameter(torch.zeros(config.num_tags * config.descriptions_per_tag, config.label_dim))
        self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.wordvec_proj = nn.Linear(config.label_dim, config.hidden_size)
        self.tagging_head = RamTaggingHead(config)
        self.fc = nn.Linear(config.hidden_size, 1)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 1 + tokens, label_dim): the pooled token first, then the last stage's grid."""
        out = self.visual_encoder(pixel_values=pixel_values)
        tokens = torch.cat([out.pooler_output.unsqueeze(1), out.last_hidden_state], dim=1)
        return self.image_proj(tokens)

    def tag_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, label_dim) pooled image embedding → (B, num_tags, hidden) tag queries.

        Each tag's description embeddings are mixed by how well they match this image (softmax over
        the tag's descriptions of the scaled cosine), so the query describes the tag as it looks here.
        """
        cfg = self.config
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        descriptions = self.label_embed.view(cfg.num_tags, cfg.descriptions_per_tag, cfg.label_dim)
        scores = self.reweight_scale.exp() * torch.einsum("bc,tdc->btd", pooled, descriptions)
        weights = scores.softmax(dim=-1)
        mixed = torch.einsum("btd,tdc->btc", weights, descriptions)
        return torch.relu(self.wordvec_proj(mixed))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tag logits, (B, num_tags); `sigmoid` gives the probabilities the thresholds apply to."""
        tokens = self.image_tokens(pixel_values)
        queries = self.tag_queries(tokens[:, 0])
        features = self.tagging_head(queries, tokens)
        return self.fc(features).squeeze(-1)
