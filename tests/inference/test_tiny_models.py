"""Tiny inference checkpoints: built by the zoo script, loaded by the real loaders, run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import tiny_models
from inference.loading import (
    CheckpointNotFoundError,
    load_image_encoder,
    load_image_prompt,
    load_inpaint_base,
)

SIZE = tiny_models.IMAGE_SIZE
NAMES = ["sd-inpainting", "ip-adapter"]


def _build(root: Path) -> Path:
    try:
        from scripts.make_tiny_models import build_zoo

        return build_zoo(root, only=NAMES, quiet=True)
    except ImportError:
        # The zoo script also imports the data-engine recipes; build ours directly without them.
        for name in NAMES:
            (root / name).mkdir(parents=True)
            tiny_models.BUILDERS[name](root / name)
        return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny-zoo"))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    subject = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return image, Image.fromarray(mask), subject


def _run(pipe, image, mask, **kwargs) -> np.ndarray:
    out = pipe(
        prompt="a photo of a red dog",
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    )
    return out.images


def test_zoo_layout_and_published_keys(zoo):
    from safetensors import safe_open

    assert (zoo / "sd-inpainting" / "model_index.json").is_file()
    assert (zoo / "sd-inpainting" / "tokenizer" / "vocab.json").is_file()
    weight = zoo / "ip-adapter" / "models" / "ip-adapter-plus_sd15.safetensors"
    with safe_open(str(weight), framework="pt") as f:
        keys = set(f.keys())
        latents = f.get_tensor("image_proj.latents")
    assert latents.shape == (1, 16, tiny_models.RESAMPLER_CONFIG["dim"])
    for key in (
        "image_proj.proj_in.weight",
        "image_proj.layers.0.0.norm1.weight",
        "image_proj.layers.3.0.to_kv.weight",
        "image_proj.layers.3.1.3.weight",
        "image_proj.norm_out.bias",
        "ip_adapter.1.to_k_ip.weight",
        "ip_adapter.1.to_v_ip.weight",
    ):
        assert key in keys
    assert not any(k.startswith("ip_adapter.0.") for k in keys)  # attn1 carries nothing
    assert not list(zoo.rglob("*.bin")) and not list(zoo.rglob("*.pt"))


def test_ip_adapter_builder_is_deterministic(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        tiny_models.BUILDERS["ip-adapter"](tmp_path / run)
    for rel in ("models/ip-adapter-plus_sd15.safetensors", "models/image_encoder/model.safetensors"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_inpaint_base_runs_and_is_deterministic(zoo, inputs):
    image, mask, _ = inputs
    pipe = load_inpaint_base(zoo / "sd-inpainting")
    assert pipe.unet.config.in_channels == 9
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == SIZE
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a photo of a red dog").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]

    first = _run(pipe, image, mask)
    second = _run(pipe, image, mask)
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_ip_adapter_plus_loads_and_steers(zoo, inputs):
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    image, mask, subject = inputs
    pipe = load_inpaint_base(zoo / "sd-inpainting")
    load_image_prompt(pipe, zoo / "ip-adapter")

    procs = pipe.unet.attn_processors
    cross = {n: p for n, p in procs.items() if n.endswith("attn2.processor")}
    assert {n.split(".")[0] for n in cross} == {"down_blocks", "mid_block", "up_blocks"}
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross.values())
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n.endswith("attn1.processor"))
    (projection,) = pipe.unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, IPAdapterPlusImageProjection)
    assert projection.latents.shape[1] == 16
    assert pipe.feature_extractor.crop_size["height"] == pipe.image_encoder.config.image_size

    pipe.set_ip_adapter_scale(1.0)
    with_subject = _run(pipe, image, mask, ip_adapter_image=subject)
    assert with_subject.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(with_subject, _run(pipe, image, mask, ip_adapter_image=subject))
    pipe.set_ip_adapter_scale(0.0)
    without = _run(pipe, image, mask, ip_adapter_image=subject)
    assert np.abs(with_subject - without).max() > 1e-4


def test_image_encoder_loader(zoo):
    encoder, processor = load_image_encoder(zoo / "ip-adapter", "models/image_encoder")
    pixels = processor(Image.new("RGB", (50, 30), "white"), return_tensors="pt").pixel_values
    assert pixels.shape[-1] == encoder.config.image_size
    hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[-1] == tiny_models.RESAMPLER_CONFIG["embedding_dim"]


def test_missing_refs_name_the_ref_and_role(tmp_path, zoo):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointNotFoundError, match="inpaint base.*no-such-model"):
        load_inpaint_base(missing)
    pipe = load_inpaint_base(zoo / "sd-inpainting")
    with pytest.raises(CheckpointNotFoundError, match="image prompt.*no-such-model"):
        load_image_prompt(pipe, missing)
    with pytest.raises(CheckpointNotFoundError, match="image prompt.*ip-adapter.*missing.safetensors"):
        load_image_prompt(pipe, zoo / "ip-adapter", weight_name="missing.safetensors")
