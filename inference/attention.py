"""Refine's attention processors (paper Eq. 9-10): RefineNet decoder self-attention features into the main UNet.

RefineNet runs first at each step; a `RefineCaptureProcessor` on each of its decoder (`up_blocks`)
self-attention layers stores that layer's input hidden states in a shared `RefineBank`. The main
UNet then runs with a `RefineInjectProcessor` on the self-attention layer of the same name, which
concatenates the stored features to its own hidden states to form keys and values
(`K = [c_ctx; c_obj] W_k`, `V = [c_ctx; c_obj] W_v`); queries stay the main UNet's. Both extend
diffusers' `AttnProcessor2_0`, so with an empty bank the main UNet computes exactly plain
self-attention. Nothing here forks the UNet: the processors are swapped in with `set_attn_processor`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class RefineShapeError(ValueError):
    """Captured RefineNet features do not fit the main UNet layer they are injected into."""


class RefineBank:
    """Per-step store of RefineNet decoder self-attention inputs, keyed by attention layer name.

    The layer name is the module path without `.processor`, e.g.
    `up_blocks.1.attentions.0.transformer_blocks.0.attn1`; RefineNet and the main UNet share the
    architecture, so the same name addresses matching layers in both.
    """

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}
        # Set by LARGenModel while it runs RefineNet: the last layer to capture. RefineNet's output is
        # unused, so its pass can stop right after that layer's input is stored.
        self.stop_after: str | None = None

    def __len__(self) -> int:
        return len(self.features)

    def clear(self) -> None:
        """Drop all stored features (an empty bank makes injection plain self-attention)."""
        self.features.clear()


class RefineCaptured(Exception):
    """Raised inside RefineNet once the bank's last layer is captured (early exit; caught by the caller)."""


class RefineCaptureProcessor(AttnProcessor2_0):
    """RefineNet side: store this self-attention layer's input (the `norm1` output), then attend as usual."""

    def __init__(self, bank: RefineBank, name: str) -> None:
        super().__init__()
        self.bank = bank
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        self.bank.features[self.name] = hidden_states
        if self.bank.stop_after == self.name:
            raise RefineCaptured(self.name)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class RefineInjectProcessor(AttnProcessor2_0):
    """Main-UNet side: self-attention whose keys/values also see the RefineNet features of the same layer.

    The bank may hold features for a batch that divides the main batch: they are tiled in blocks
    (`cat([ref] * k)`), which is how the pipeline shares one RefineNet pass between the
    unconditional and conditional halves of a classifier-free-guidance batch.
    """

    def __init__(self, bank: RefineBank, name: str) -> None:
        super().__init__()
        self.bank = bank
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ref = self.bank.features.get(self.name)
        if ref is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None:
            raise RefineShapeError(f"{self.name}: Refine injects into self-attention, but got a cross-attention context")
        if hidden_states.ndim != 3 or ref.ndim != 3:
            raise RefineShapeError(
                f"{self.name}: expected [batch, tokens, channels] features, got main {tuple(hidden_states.shape)} "
                f"and RefineNet {tuple(ref.shape)}"
            )
        batch, _, channels = hidden_states.shape
        if ref.shape[-1] != channels or batch % ref.shape[0] != 0:
            raise RefineShapeError(
                f"{self.name}: RefineNet features {tuple(ref.shape)} do not match the main UNet layer's input "
                f"{tuple(hidden_states.shape)} (channels must be equal and the main batch a multiple of "
                f"RefineNet's); RefineNet must have the main UNet's architecture"
            )
        if ref.shape[0] != batch:
            ref = ref.repeat(batch // ref.shape[0], 1, 1)
        context = torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1)
        return super().__call__(attn, hidden_states, context, attention_mask, temb, *args, **kwargs)


def decoder_self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names (without `.processor`) of the self-attention (`attn1`) layers in a UNet's decoder (`up_blocks`)."""
    return [
        name[: -len(".processor")]
        for name in unet.attn_processors
        if name.startswith("up_blocks.") and name.endswith("attn1.processor")
    ]


def _replace_processors(unet: torch.nn.Module, replacements: dict[str, object]) -> None:
    procs = dict(unet.attn_processors)
    for name, proc in replacements.items():
        key = f"{name}.processor"
        if key not in procs:
            raise KeyError(f"{key!r} is not an attention processor of this UNet")
        procs[key] = proc
    unet.set_attn_processor(procs)


def _connected_bank(main_procs: dict, ref_procs: dict, names: list[str]) -> RefineBank | None:
    """The bank already shared by every named layer's capture/inject pair, else None."""
    banks = set()
    for name in names:
        inject, capture = main_procs.get(f"{name}.processor"), ref_procs.get(f"{name}.processor")
        if not isinstance(inject, RefineInjectProcessor) or not isinstance(capture, RefineCaptureProcessor):
            return None
        banks.update({id(inject.bank), id(capture.bank)})
    if len(banks) != 1:
        return None
    return main_procs[f"{names[0]}.processor"].bank if names else None


def install_refine(
    unet: torch.nn.Module, refinenet: torch.nn.Module, bank: RefineBank | None = None, layers: Iterable[str] | None = None
) -> RefineBank:
    """Put capture processors on RefineNet's decoder self-attention and inject processors on the main UNet's.

    Args:
        unet: the main UNet; its other processors (e.g. IP-Adapter on attn2) are kept.
        refinenet: the RefineNet (same architecture as `unet` except the input channels).
        bank: the bank to share; a new one when None.
        layers: layer names to connect; default every decoder self-attention layer of `refinenet`.

    Returns:
        The bank both sides share.

    Raises:
        RefineShapeError: a layer exists in RefineNet but not in the main UNet (architectures differ).
    """
    names = list(layers) if layers is not None else decoder_self_attention_layers(refinenet)
    main_procs = unet.attn_processors
    ref_procs = refinenet.attn_processors
    existing = _connected_bank(main_procs, ref_procs, names)
    if existing is not None and (bank is None or bank is existing):
        return existing  # already connected (e.g. a second LARGenModel over the same modules)
    bank = bank if bank is not None else RefineBank()
    main_layers = {n[: -len(".processor")] for n in main_procs}
    missing = [n for n in names if n not in main_layers]
    if missing:
        raise RefineShapeError(f"RefineNet layers {missing} have no match in the main UNet; architectures differ")
    _replace_processors(refinenet, {n: RefineCaptureProcessor(bank, n) for n in names})
    _replace_processors(unet, {n: RefineInjectProcessor(bank, n) for n in names})
    return bank
