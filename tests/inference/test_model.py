"""LAR-Gen model pieces on the tiny zoo: Assign loading/layout, Refine injection, null image, training stages."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from safetensors.torch import load_file

from inference.attention import (
    RefineBank,
    RefineInjectProcessor,
    RefineShapeError,
    decoder_self_attention_layers,
)
from inference.loading import load_image_encoder, load_image_prompt, load_inpaint_base
from inference.model import AssignAdapter, DetailEncoder, LARGenModel, refinenet_from_unet

IP_FILE = "ip-adapter/models/ip-adapter-plus_sd15.safetensors"


@pytest.fixture(scope="module")
def parts(tiny_zoo):
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo / "sd-inpainting", subfolder="unet")
    encoder, _ = load_image_encoder(tiny_zoo / "ip-adapter")
    state = load_file(str(tiny_zoo / IP_FILE))
    return unet, encoder, state


def _model(parts, refine: bool) -> LARGenModel:
    unet, encoder, state = parts
    unet = copy.deepcopy(unet)
    model = LARGenModel(unet, AssignAdapter.from_published(state, unet), encoder)
    if refine:
        model.add_refine()
    return model.eval()


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy_latents=torch.randn(batch, 4, 8, 8, generator=g),
        timesteps=torch.full((batch,), 500),
        mask=(torch.rand(batch, 1, 8, 8, generator=g) > 0.5).float(),
        masked_image_latents=torch.randn(batch, 4, 8, 8, generator=g),
        text_embeds=torch.randn(batch, 77, 32, generator=g),
    )


def test_published_layout_round_trips_and_matches_diffusers_loader(parts, tiny_zoo):
    unet, encoder, state = parts
    adapter = AssignAdapter.from_published(state, unet)
    published = adapter.published_state_dict()
    assert set(published) == set(state)
    assert all(torch.equal(published[k], state[k]) for k in state)

    # diffusers' own loader (load_ip_adapter) builds the same resampler and processors.
    pipe = load_inpaint_base(tiny_zoo / "sd-inpainting")
    load_image_prompt(pipe, tiny_zoo / "ip-adapter")
    theirs = pipe.unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    ours = adapter.image_proj.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)

    # ...and the same noise prediction for the same subject and beta.
    model = _model(parts, refine=False)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = _inputs()
    with torch.no_grad():
        hidden = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        pipe.set_ip_adapter_scale(0.3)
        sample = torch.cat([x["noisy_latents"], x["mask"], x["masked_image_latents"]], 1)
        reference = pipe.unet(
            sample, x["timesteps"], encoder_hidden_states=x["text_embeds"],
            added_cond_kwargs={"image_embeds": [hidden.unsqueeze(1)]},
        ).sample
        image_embeds, detail = model.encode_subject(pixels)
        ours_pred = model(**x, image_embeds=image_embeds, beta=0.3)
    assert detail is None
    torch.testing.assert_close(ours_pred, reference, rtol=0, atol=1e-6)


def test_adapter_rejects_non_plus_and_mismatched_weights(parts):
    unet, _, state = parts
    with pytest.raises(ValueError, match="Plus"):
        AssignAdapter.from_published({k: v for k, v in state.items() if k != "image_proj.latents"}, unet)
    with pytest.raises(ValueError, match="unexpected key"):
        AssignAdapter.from_published({**state, "lora.x": torch.zeros(1)}, unet)
    adapter = AssignAdapter.from_published(state, unet)
    broken = {k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")}
    with pytest.raises(ValueError, match=r"ip_adapter\.1\.to_k_ip"):
        adapter.load_published_state_dict(broken)


def test_unet_keeps_plain_layout_and_adapter_processors_are_shared(parts):
    model = _model(parts, refine=False)
    procs = model.unet.attn_processors
    attn2 = [p for n, p in procs.items() if n.endswith("attn2.processor")]
    assert attn2 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in attn2)
    assert all(a is b for a, b in zip(attn2, model.ip_adapter.attn_processors))
    assert model.unet.encoder_hid_proj is None and model.unet.config.encoder_hid_dim_type is None


def test_beta_zero_means_no_image_influence_and_beta_matters(parts):
    model = _model(parts, refine=False)
    x = _inputs()
    a, b = torch.randn(2, 2, 16, 32).unbind(0)
    with torch.no_grad():
        assert torch.equal(model(**x, image_embeds=a, beta=0.0), model(**x, image_embeds=b, beta=0.0))
        assert (model(**x, image_embeds=a, beta=1.0) - model(**x, image_embeds=b, beta=1.0)).abs().max() > 1e-4


def test_null_image_is_resampled_zero_image_and_is_the_default(parts):
    model = _model(parts, refine=False)
    with torch.no_grad():
        null = model.null_image_embeds(3)
        zeros = torch.zeros(1, 3, 32, 32)
        expected = model.image_proj(model.image_encoder(zeros, output_hidden_states=True).hidden_states[-2])
        assert null.shape == (3, 16, 32)
        assert torch.equal(null[0], expected[0]) and torch.equal(null[2], expected[0])
        x = _inputs()
        assert torch.equal(model(**x, image_embeds=None, beta=1.0), model(**x, image_embeds=model.null_image_embeds(2), beta=1.0))


def test_refinenet_is_a_4_channel_copy(parts):
    unet = parts[0]
    refinenet = refinenet_from_unet(unet)
    assert refinenet.config.in_channels == 4 and unet.config.in_channels == 9
    assert torch.equal(refinenet.conv_in.weight, unet.conv_in.weight[:, :4])
    theirs = unet.state_dict()
    for key, value in refinenet.state_dict().items():
        if key != "conv_in.weight":
            assert torch.equal(value, theirs[key]), key
    assert refinenet.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()


def test_empty_bank_is_plain_self_attention_bit_exact(parts):
    model = _model(parts, refine=True)
    inject = [n for n, p in model.unet.attn_processors.items() if isinstance(p, RefineInjectProcessor)]
    assert [n[: -len(".processor")] for n in inject] == decoder_self_attention_layers(model.refinenet)
    model.ip_adapter.set_scale(0.3)  # the copy's IP processors must carry the beta the model call uses
    plain = copy.deepcopy(model.unet)
    plain.set_attn_processor({n: (AttnProcessor2_0() if n in inject else p) for n, p in plain.attn_processors.items()})
    x = _inputs()
    image_embeds = torch.randn(2, 16, 32)
    with torch.no_grad():
        ours = model(**x, image_embeds=image_embeds, beta=0.3)  # no refine_latents: the bank stays empty
        sample = torch.cat([x["noisy_latents"], x["mask"], x["masked_image_latents"]], 1)
        reference = plain(sample, x["timesteps"], encoder_hidden_states=(x["text_embeds"], [image_embeds])).sample
    assert torch.equal(ours, reference)  # bit-exact: the same AttnProcessor2_0 code path runs
    assert len(model.bank) == 0


def test_refine_changes_prediction_and_is_shared_across_cfg_halves(parts):
    model = _model(parts, refine=True)
    x = _inputs(batch=2)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image_embeds, detail = model.encode_subject(pixels)
        assert detail.shape == (1, 16, 32)  # 16 CLIP patch tokens (CLS dropped) -> RefineNet context dim
        ref = torch.randn(1, 4, 8, 8)
        embeds = image_embeds.repeat(2, 1, 1)
        off = model(**x, image_embeds=embeds, beta=0.3)
        on = model(**x, image_embeds=embeds, beta=0.3, refine_latents=ref, detail_embeds=detail)
        tiled = model(**x, image_embeds=embeds, beta=0.3, refine_latents=ref.repeat(2, 1, 1, 1), detail_embeds=detail.repeat(2, 1, 1))
    assert (on - off).abs().max() > 1e-4
    torch.testing.assert_close(on, tiled, rtol=1e-5, atol=1e-6)  # one RefineNet pass == per-sample passes
    assert len(model.bank) == 0  # cleared after each call
    with pytest.raises(ValueError, match="detail_embeds"):
        model(**x, image_embeds=embeds, refine_latents=ref)


def test_refine_shape_mismatch_is_a_clear_error(parts):
    model = _model(parts, refine=True)
    name = decoder_self_attention_layers(model.refinenet)[0]
    bank = RefineBank()
    proc = RefineInjectProcessor(bank, name)
    attn = model.unet.get_submodule(name)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    bank.features[name] = torch.randn(2, 64, attn.to_q.in_features + 1)
    with pytest.raises(RefineShapeError, match="do not match"):
        proc(attn, hidden)
    bank.features[name] = torch.randn(3, 64, attn.to_q.in_features)
    with pytest.raises(RefineShapeError, match="batch"):
        proc(attn, hidden)


def test_trainable_parameters_per_stage(parts):
    model = _model(parts, refine=False)
    stage1 = dict(model.trainable_parameters(1))
    assert any(n.endswith("to_k_ip.0.weight") for n in stage1) and any(n.endswith("to_v_ip.0.weight") for n in stage1)
    assert all(n.startswith("unet.") for n in stage1)
    names = {n for n, _ in model.named_parameters()}
    assert set(stage1) <= names
    ids1 = {id(p) for p in stage1.values()}
    assert not ids1 & {id(p) for p in model.image_proj.parameters()}
    assert not ids1 & {id(p) for p in model.image_encoder.parameters()}
    with pytest.raises(ValueError, match="add_refine"):
        model.trainable_parameters(2)
    model.add_refine()
    stage2 = model.trainable_parameters(2)
    assert {n for n, _ in stage2} <= {n for n, _ in model.named_parameters()}
    assert all(".attn2." in n or n.startswith("detail_encoder.") for n, _ in stage2)
    assert {id(p) for _, p in stage2}.isdisjoint({id(p) for p in model.unet.parameters()})
    assert {id(p) for p in model.detail_encoder.parameters()} <= {id(p) for _, p in stage2}
    with pytest.raises(ValueError, match="stage"):
        model.trainable_parameters(3)


def test_stage2_parameters_are_exactly_those_that_reach_the_output(parts):
    model = _model(parts, refine=True).requires_grad_(False)
    candidates = {f"refinenet.{n}": p for n, p in model.refinenet.named_parameters() if ".attn2." in n}
    candidates.update({f"detail_encoder.{n}": p for n, p in model.detail_encoder.named_parameters()})
    for p in candidates.values():
        p.requires_grad_(True)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    image_embeds, detail = model.encode_subject(pixels)
    out = model(**_inputs(batch=2), image_embeds=image_embeds.repeat(2, 1, 1).detach(), beta=0.3,
                refine_latents=torch.randn(1, 4, 8, 8), detail_embeds=detail)
    out.square().sum().backward()
    reached = {n for n, p in candidates.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {n for n, _ in model.trainable_parameters(2)}
    assert reached != set(candidates)  # the last captured block's attn2 is really unreachable


def test_detail_encoder_config_round_trip(tmp_path):
    enc = DetailEncoder(in_dim=32, out_dim=48)
    enc.save_pretrained(tmp_path)
    again = DetailEncoder.from_pretrained(tmp_path)
    x = torch.randn(1, 5, 32)
    assert torch.equal(enc(x), again(x)) and again.config.out_dim == 48


def test_refinenet_early_exit_captures_the_same_features(parts):
    model = _model(parts, refine=True)
    ref, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    detail = torch.randn(1, 16, 32)
    with torch.no_grad():
        model.refinenet(ref, t, encoder_hidden_states=detail)  # full pass, no early exit
        full = dict(model.bank.features)
        model.bank.clear()
        x = _inputs(batch=1)
        model(**x, image_embeds=None, refine_latents=ref, detail_embeds=detail)  # fills, stops early, clears
        model.bank.stop_after = decoder_self_attention_layers(model.refinenet)[-1]
        with pytest.raises(Exception, match="attn1"):
            model.refinenet(ref, t, encoder_hidden_states=detail)
        model.bank.stop_after = None
    assert set(model.bank.features) == set(full)
    assert all(torch.equal(model.bank.features[k], full[k]) for k in full)
