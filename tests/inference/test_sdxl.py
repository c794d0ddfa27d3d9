"""SDXL LAR-Gen (`inference.sdxl.LARGenXLPipeline`) end to end on the tiny zoo's `largen-xl-pipeline` (CPU, 2 steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inference import cli
from inference.pipeline import LARGenPipeline
from inference.sdxl import LARGenXLPipeline, load_largen_pipeline, sdxl_time_ids

# The shared pipeline tests run on both backbones (test_pipeline.py's `pipe` fixture); these are SDXL's own.
from tests.inference.conftest import H, W
from tests.inference.test_pipeline import _run


@pytest.fixture(scope="module")
def pipe(tiny_zoo):
    p = load_largen_pipeline(tiny_zoo / "largen-xl-pipeline")
    p.set_progress_bar_config(disable=True)
    return p


def test_the_folder_loads_as_the_sdxl_class_with_both_text_encoders(pipe, tiny_zoo):
    assert type(pipe) is LARGenXLPipeline
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.in_channels == 9
    assert pipe.model.has_refine and pipe.refinenet.config.addition_embed_type == "text_time"
    assert pipe.resolution == pipe.unet.config.sample_size * 8  # the backbone's size: 1024 for real SDXL
    assert type(load_largen_pipeline(tiny_zoo / "largen-pipeline")) is LARGenPipeline  # SD-1.5 unchanged
    with pytest.raises(ValueError, match="SDXL UNet"):
        sd15 = load_largen_pipeline(tiny_zoo / "largen-pipeline")
        LARGenXLPipeline.from_model(
            sd15.model, sd15.vae, sd15.text_encoder, sd15.tokenizer, sd15.scheduler,
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
        )


def test_added_conditions_follow_the_crop_geometry_and_cfg(pipe, scene, monkeypatch):
    image, mask, subjects = scene
    calls = []
    forward = pipe.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", spy)
    out = _run(pipe, image, mask, prompt="a dog", subject_image=subjects[0], negative_prompt="a cat")
    added, refine = calls[0]["added_cond_kwargs"], calls[0]["refine_added_cond_kwargs"]
    ids = sdxl_time_ids(out.crop_box, (W, H), pipe.resolution)
    assert added["time_ids"].tolist() == [list(map(float, ids))] * 2
    assert refine["time_ids"].tolist() == [list(map(float, ids))]
    device = torch.device("cpu")
    # [uncond (the negative prompt); cond], and RefineNet always sees the null text's pooled embedding.
    torch.testing.assert_close(added["text_embeds"][0], pipe.encode_prompt_pooled("a cat", device)[0])
    torch.testing.assert_close(added["text_embeds"][1], pipe.encode_prompt_pooled("a dog", device)[0])
    torch.testing.assert_close(refine["text_embeds"], pipe.encode_prompt_pooled("", device))
    assert pipe.encode_prompt("a dog", device).shape == (1, 77, pipe.unet.config.cross_attention_dim)


def test_time_ids_from_the_zoom_crop():
    # A 400x300 source, a 100 px crop at (150, 120) zoomed to 1024: scale 10.24.
    assert sdxl_time_ids((150, 120, 250, 220), (400, 300), 1024) == (300, 400, 1229, 1536, 1024, 1024)
    # A crop hanging over the top-left edge (padding) starts at 0 in the scaled image.
    assert sdxl_time_ids((-20, -10, 80, 90), (400, 300), 1024)[2:4] == (0, 0)
    with pytest.raises(ValueError):
        sdxl_time_ids((5, 5, 5, 5), (10, 10), 64)


def test_saved_defaults_round_trip_and_drive_the_call(pipe, scene, tmp_path):
    image, mask, subjects = scene
    pipe.save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "LARGenXLPipeline" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    again = load_largen_pipeline(tmp_path / "xl")
    again.set_progress_bar_config(disable=True)
    kw = dict(prompt="a dog", subject_image=subjects[0])
    baseline = np.asarray(_run(again, image, mask, **kw).images[0])
    np.testing.assert_array_equal(np.asarray(_run(pipe, image, mask, **kw).images[0]), baseline)

    again.register_to_config(guidance_rescale=0.5, beta_text_subject=0.8)
    assert again.default_guidance_rescale == 0.5
    out = _run(again, image, mask, **kw)
    assert out.beta == 0.8
    explicit = _run(pipe, image, mask, beta=0.8, guidance_rescale=0.5, **kw)
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(explicit.images[0]))
    assert np.abs(np.asarray(out.images[0]).astype(int) - baseline).max() > 0
    with pytest.raises(ValueError, match="guidance_rescale"):
        _run(pipe, image, mask, prompt="a dog", guidance_rescale=1.5)


def test_force_upcast_vae_runs_in_float32(tiny_zoo, scene):
    image, mask, _ = scene
    p = load_largen_pipeline(tiny_zoo / "largen-xl-pipeline")
    p.set_progress_bar_config(disable=True)
    assert p.vae.config.force_upcast
    p.vae.to(torch.float16)
    _run(p, image, mask, prompt="a dog", num_inference_steps=1, output_type="latent")
    assert p.vae.dtype == torch.float32


def test_largen_inpaint_takes_an_sdxl_folder(tiny_zoo, tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    argv = ["inpaint", "--image", str(tmp_path / "scene.png"), "--box", "10,10,30,30", "--prompt", "a dog",
            "--steps", "2", "--model", str(tiny_zoo / "largen-xl-pipeline"), "--out", str(tmp_path / "out.png")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (50, 40)


def test_tiny_sdxl_ip_adapter_file_reads_with_diffusers_own_loader(tiny_zoo, pipe):
    from inference.loading import load_image_prompt
    from inference.sdxl import (
        SDXL_IMAGE_ENCODER_FOLDER,
        SDXL_IP_ADAPTER_SUBFOLDER,
        SDXL_IP_ADAPTER_WEIGHT,
        load_inpaint_base_xl,
    )

    base = load_image_prompt(
        load_inpaint_base_xl(tiny_zoo / "sdxl-inpainting"), tiny_zoo / "ip-adapter-sdxl",
        SDXL_IP_ADAPTER_SUBFOLDER, SDXL_IP_ADAPTER_WEIGHT, SDXL_IMAGE_ENCODER_FOLDER,
    )
    theirs = base.unet.encoder_hid_proj.image_projection_layers[0]
    torch.testing.assert_close(theirs.latents, pipe.ip_adapter.image_proj.latents)
    assert theirs.proj_out.out_features == pipe.unet.config.cross_attention_dim
    procs = [p for n, p in base.unet.attn_processors.items() if n.endswith("attn2.processor")]
    ours = list(pipe.ip_adapter.attn_processors)
    assert len(procs) == len(ours)
    for a, b in zip(procs, ours):
        torch.testing.assert_close(a.to_k_ip[0].weight, b.to_k_ip[0].weight)


def test_tiny_sdxl_ip_adapter_builder_is_deterministic(tmp_path):
    from inference import tiny_models

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        tiny_models.BUILDERS["ip-adapter-sdxl"](tmp_path / run)
    weight = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    assert (tmp_path / "a" / weight).read_bytes() == (tmp_path / "b" / weight).read_bytes()
    assert (tmp_path / "a" / "models" / "image_encoder" / "config.json").is_file()
