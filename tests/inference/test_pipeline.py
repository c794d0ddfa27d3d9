"""LARGenPipeline end to end on the tiny zoo's `largen-pipeline` (CPU, 2 steps): modes, exactness, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from inference import LARGenPipeline, load_largen_pipeline
from inference.session import EditingSession
from inference.zoom import blend_alpha, mask_box, zoom_box
from tests.inference.conftest import H, W  # the `scene` fixture's odd, non-square size

STEPS = 2


@pytest.fixture(scope="module", params=["largen-pipeline", "largen-xl-pipeline"])
def pipe(tiny_zoo, request):
    """Every test that takes `pipe` runs on both backbones: SD-1.5 and SDXL (`LARGenXLPipeline`)."""
    p = load_largen_pipeline(tiny_zoo / request.param)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, image, mask, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(image, mask, generator=torch.Generator().manual_seed(seed), **kwargs)


def _outside_dilated(mask: Image.Image, pipe_out) -> np.ndarray:
    x0, y0, x1, y1 = pipe_out.crop_box
    dilation = max(2, round(0.02 * (x1 - x0)))
    return blend_alpha(mask, dilation, max(1, dilation // 2)) == 0


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("text", {"prompt": "a red dog"}),
        ("subject", {"subject": 0}),
        ("text+subject", {"prompt": "a red dog", "subject": 0}),
    ],
)
def test_modes_run_on_odd_sizes_deterministic_and_exact_outside(pipe, scene, mode, kwargs):
    image, mask, subjects = scene
    kwargs = dict(kwargs)
    if "subject" in kwargs:
        kwargs["subject_image"] = subjects[kwargs.pop("subject")]
    first = _run(pipe, image, mask, **kwargs)
    second = _run(pipe, image, mask, **kwargs)
    assert first.mode == mode
    out = np.asarray(first.images[0])
    assert first.images[0].size == (W, H)
    np.testing.assert_array_equal(out, np.asarray(second.images[0]))
    outside = _outside_dilated(mask, first)
    assert outside.sum() > 0.5 * outside.size
    np.testing.assert_array_equal(out[outside], np.asarray(image)[outside])
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside].astype(int) - np.asarray(image)[inside]).mean() > 1  # the region was repainted


def test_box_mask_no_zoom_and_np_output(pipe, scene):
    image, _, _ = scene
    box = (30, 10, 60, 45)
    out = _run(pipe, image, box, prompt="a cat", zoom_in=False, output_type="np")
    assert out.images.shape == (1, H, W, 3) and out.images.dtype == np.float32
    x0, y0, x1, y1 = out.crop_box
    assert x1 - x0 == y1 - y0 == max(W, H)  # the whole image, padded to a square
    arr = np.zeros((H, W), np.uint8)
    arr[10:45, 30:60] = 255
    outside = _outside_dilated(Image.fromarray(arr), out)
    np.testing.assert_array_equal((out.images[0] * 255).round().astype(np.uint8)[outside], np.asarray(image)[outside])


def test_no_refine_and_beta_zero_makes_the_subject_irrelevant(pipe, scene):
    image, mask, (a, b) = scene
    kw = dict(prompt="a dog", beta=0.0, use_refine=False)
    out_a = np.asarray(_run(pipe, image, mask, subject_image=a, **kw).images[0])
    out_b = np.asarray(_run(pipe, image, mask, subject_image=b, **kw).images[0])
    np.testing.assert_array_equal(out_a, out_b)
    # ...while with Refine on, the subject does matter even at beta = 0.
    ref_a = np.asarray(_run(pipe, image, mask, subject_image=a, prompt="a dog", beta=0.0).images[0])
    ref_b = np.asarray(_run(pipe, image, mask, subject_image=b, prompt="a dog", beta=0.0).images[0])
    assert np.abs(ref_a.astype(int) - ref_b).max() > 0


def test_text_only_uses_the_shared_null_image_condition(pipe, scene):
    image, mask, _ = scene
    seen = {}

    def grab(p, i, t, kwargs):
        seen["image_embeds"] = kwargs["image_embeds"]
        return {}

    _run(pipe, image, mask, prompt="a dog", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["image_embeds"])
    null = pipe.model.null_image_embeds(2)  # the definition the trainer's image dropout uses
    assert torch.equal(seen["image_embeds"], null)  # both CFG halves: null image


def test_callback_can_edit_latents(pipe, scene):
    image, mask, _ = scene
    steps = []

    def cb(p, i, t, kwargs):
        steps.append(int(t))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = _run(pipe, image, mask, prompt="a dog", callback_on_step_end=cb, output_type="latent")
    assert len(steps) == STEPS and torch.count_nonzero(out.images) == 0


def test_save_then_load_gives_identical_outputs_and_a_plain_unet(pipe, scene, tmp_path):
    image, mask, subjects = scene
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["ip_adapter"] == ["inference.model", "AssignAdapter"]
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "saved"]  # no temp folders left behind

    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "saved", subfolder="unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any("to_k_ip" in k for k in unet.state_dict())

    again = load_largen_pipeline(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    kw = dict(prompt="a dog", subject_image=subjects[0])
    np.testing.assert_array_equal(np.asarray(_run(pipe, image, mask, **kw).images[0]), np.asarray(_run(again, image, mask, **kw).images[0]))


def test_published_ip_adapter_plus_loads_and_beta_steers(tiny_zoo, scene):
    image, mask, subjects = scene
    base = LARGenPipeline.from_base(tiny_zoo / "sd-inpainting", tiny_zoo / "ip-adapter", with_refine=False)
    base.set_progress_bar_config(disable=True)
    assert base.refinenet is None and not base.model.has_refine
    kw = dict(prompt="a dog", subject_image=subjects[0])
    low = np.asarray(_run(base, image, mask, beta=0.0, **kw).images[0])
    high = np.asarray(_run(base, image, mask, beta=1.0, **kw).images[0])
    assert np.abs(low.astype(int) - high).max() > 0


def test_bad_inputs_are_clear_errors(pipe, scene):
    image, mask, _ = scene
    with pytest.raises(ValueError, match="prompt, a subject_image, or both"):
        pipe(image, mask)
    with pytest.raises(ValueError, match="mask_image is 10x10 but image is 75x53"):
        pipe(image, Image.new("L", (10, 10), 255), prompt="a dog")
    with pytest.raises(ValueError, match="mask is empty"):
        pipe(image, Image.new("L", image.size, 0), prompt="a dog")
    with pytest.raises(ValueError, match="box"):
        pipe(image, (80, 80, 90, 90), prompt="a dog")
    with pytest.raises(ValueError, match="output_type"):
        pipe(image, mask, prompt="a dog", output_type="jpg")


def test_multi_turn_edits_chain_and_undo_restores(pipe, scene):
    image, mask, subjects = scene
    session = EditingSession(pipe, image, num_inference_steps=STEPS, generator=None)
    first = session.edit(mask, prompt="a red dog", generator=torch.Generator().manual_seed(0))
    second = session.edit((5, 5, 30, 30), subject_image=subjects[0], generator=torch.Generator().manual_seed(1))
    assert len(session) == 2
    assert session.history[1].source is first  # turn 2 edited turn 1's output
    f, s = np.asarray(first), np.asarray(second)
    assert np.abs(f.astype(int) - s).max() > 0
    # Turn 2 left turn 1's region (far from its box) as turn 1 made it.
    np.testing.assert_array_equal(s[40:, 55:], f[40:, 55:])
    assert session.undo() is first and session.current is first
    assert session.undo().tobytes() == image.tobytes()
    with pytest.raises(IndexError):
        session.undo()
    assert session.redo() is first


def test_zoom_crop_follows_the_mask(pipe, scene):
    image, mask, _ = scene
    out = _run(pipe, image, mask, prompt="a dog", zoom_expansion=1.5)
    assert out.crop_box == zoom_box(mask_box(mask), image.size, 1.5)


@pytest.mark.parametrize(
    "mode, prompt, with_subject, paper_beta",
    [
        ("subject", None, True, 1.0),  # Table 1, last row: beta = 1.0, no text
        ("text+subject", "a red dog", True, 0.3),  # Table 1: beta = 0.3 with text
        ("text", "a red dog", False, 0.3),  # the null image at stage 2's strength
    ],
)
def test_beta_none_is_the_modes_paper_default(pipe, scene, mode, prompt, with_subject, paper_beta):
    image, mask, subjects = scene
    kwargs = {"prompt": prompt, "subject_image": subjects[0] if with_subject else None}
    default = _run(pipe, image, mask, output_type="latent", **kwargs)
    explicit = _run(pipe, image, mask, output_type="latent", beta=paper_beta, **kwargs)
    assert default.mode == mode and default.beta == explicit.beta == paper_beta
    assert torch.equal(default.images, explicit.images)
    # ...and the default is not a no-op: another beta changes the result.
    other = _run(pipe, image, mask, output_type="latent", beta=0.6, **kwargs)
    assert not torch.equal(default.images, other.images)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"beta": float("nan")}, ValueError, "beta must be a finite number"),
        ({"beta": -0.1}, ValueError, r"beta must be in \[0, 2\]"),
        ({"beta": 2.5}, ValueError, r"beta must be in \[0, 2\]"),
        ({"beta": "0.3"}, TypeError, "beta must be a number"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be >= 0"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be >= 1"),
        ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps must be an integer"),
        ({"num_inference_steps": 1001}, ValueError, "num_inference_steps must be <= 1000"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(pipe, scene, kwargs, error, match):
    image, mask, _ = scene
    with pytest.raises(error, match=match):
        pipe(image, mask, prompt="a dog", **kwargs)


def test_session_turns_use_and_record_their_modes_beta(pipe, scene):
    image, mask, subjects = scene
    session = EditingSession(pipe, image, num_inference_steps=STEPS)
    g = torch.Generator().manual_seed
    first = session.edit(mask, subject_image=subjects[0], generator=g(0))
    second = session.edit(mask, prompt="a dog", subject_image=subjects[1], generator=g(0))
    assert [t.options["beta"] for t in session.history] == [1.0, 0.3]
    direct = _run(pipe, image, mask, subject_image=subjects[0], beta=1.0).images[0]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(direct))
    direct = _run(pipe, first, mask, prompt="a dog", subject_image=subjects[1], beta=0.3).images[0]
    np.testing.assert_array_equal(np.asarray(second), np.asarray(direct))
    # A session-wide beta still wins over the mode default.
    fixed = EditingSession(pipe, image, num_inference_steps=STEPS, beta=0.5)
    fixed.edit(mask, subject_image=subjects[0], generator=g(0))
    assert fixed.history[0].options["beta"] == 0.5
