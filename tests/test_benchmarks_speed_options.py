"""Speed options of the pipeline, the CLI and the trainer (measured by `make bench-gpu`): same results on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.cli import EXIT_USAGE, main
from inference.pipeline import LARGenPipeline


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    subject = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return image, mask, subject


def _inpaint(pipe: LARGenPipeline, inputs, refine: bool, steps: int = 1) -> np.ndarray:
    image, mask, subject = inputs
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image, mask, prompt="a cup", subject_image=subject, num_inference_steps=steps, use_refine=refine,
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images[0]).astype(int)


@pytest.fixture(scope="module")
def baseline(tiny_zoo, inputs):
    pipe = LARGenPipeline.from_pretrained(tiny_zoo / "largen-pipeline")
    return {refine: _inpaint(pipe, inputs, refine) for refine in (True, False)}


def test_channels_last_gives_the_same_image(tiny_zoo, inputs, baseline):
    pipe = LARGenPipeline.from_pretrained(tiny_zoo / "largen-pipeline").optimize(channels_last=True)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.refinenet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # Float rounding differs between memory layouts: measured at most 1 grey level.
    assert np.abs(_inpaint(pipe, inputs, refine=True) - baseline[True]).max() <= 2


@pytest.mark.slow
def test_compiled_unet_gives_the_same_image(tiny_zoo, inputs, baseline):
    """torch.compile in place, traced by dynamo through the IP-Adapter processors (~5 s on 2 cores).

    The backend is dynamo's `eager` (it runs the captured graphs as they are): inductor's code
    generation takes ~50 s cold on this CPU for a 1-step call, which `make bench-gpu` pays on the GPU.
    """
    pipe = LARGenPipeline.from_pretrained(tiny_zoo / "largen-pipeline")
    pipe.optimize(compile=True, compile_backend="eager")
    names = {n for n, _ in pipe.unet.named_parameters()}
    assert not any(n.startswith("_orig_mod") for n in names)  # in place: checkpoints keep their names
    assert np.array_equal(_inpaint(pipe, inputs, refine=False), baseline[False])


def test_cli_refuses_float16_on_the_cpu_before_loading(tmp_path, tiny_zoo, capsys, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "scene.png")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for an input that should have been refused first")

    monkeypatch.setattr(LARGenPipeline, "from_pretrained", refuse)
    code = main(["inpaint", "--image", str(tmp_path / "scene.png"), "--box", "2,2,20,20", "--prompt", "a cup",
                 "--out", str(tmp_path / "out.png"), "--model", str(tiny_zoo / "largen-pipeline"),
                 "--device", "cpu", "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.count("\n") == 1, err
    assert err.startswith("largen: error: --dtype float16 needs a CUDA device")
    assert not (tmp_path / "out.png").exists()


def test_cli_runs_with_bfloat16_and_channels_last(tmp_path, tiny_zoo, capsys):
    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "scene.png")
    code = main(["inpaint", "--image", str(tmp_path / "scene.png"), "--box", "2,2,20,20", "--prompt", "a cup",
                 "--out", str(tmp_path / "out.png"), "--model", str(tiny_zoo / "largen-pipeline"), "--steps", "1",
                 "--device", "cpu", "--dtype", "bfloat16", "--channels-last"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_trainer_speed_options_are_typed_config_keys():
    from pydantic import ValidationError

    from training.config import OptimConfig

    opt = OptimConfig.model_validate({"channels_last": True, "compile": True})
    assert opt.channels_last is True and opt.compile is True
    assert OptimConfig().channels_last is False and OptimConfig().compile is False
    with pytest.raises(ValidationError, match="channels_last"):
        OptimConfig.model_validate({"channels_last": "sometimes"})
