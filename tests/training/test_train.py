"""The two-stage trainer on the tiny zoo: freezing per stage, exact resume, broken data, export, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataengine.typed_config import ConfigError
from inference.pipeline import LARGenPipeline
from training.config import load_train_config
from training.train import TRAINABLE_WEIGHTS, list_checkpoints, load_model, main, train

REPO = Path(__file__).resolve().parents[2]


def stage_config(stage: int, tiny_zoo: Path, shards: list[str], out: Path, steps: int, *extra: str,
                 pretrained: str | None = None):
    """The shipped stage YAML, pointed at the tiny zoo and small synthetic shards."""
    sets = [
        f"data.shards={json.dumps(shards)}", "data.resolution=64", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=8", "data.shuffle_initial=4",
        f"optim.max_steps={steps}", "optim.learning_rate=1e-3", "optim.lr_warmup_steps=0",
        "optim.mixed_precision=no", "optim.gradient_checkpointing=false", "optim.gradient_accumulation_steps=1",
        "validation.every=0", f"output.dir={out}", "checkpoint.every=2",
    ]
    if pretrained:
        sets += ["model.base=null", f"model.pretrained={pretrained}"]
    else:
        sets += [f"model.base.inpaint={tiny_zoo / 'sd-inpainting'}", f"model.base.image_prompt={tiny_zoo / 'ip-adapter'}"]
    return load_train_config(REPO / f"training/configs/stage{stage}.yaml", [*sets, *extra])


def model_params(pipe_or_dir) -> dict[str, torch.Tensor]:
    pipe = LARGenPipeline.from_pretrained(pipe_or_dir) if isinstance(pipe_or_dir, str | Path) else pipe_or_dir
    return {n: p.detach().clone() for n, p in pipe.model.named_parameters()}


@pytest.fixture(scope="module")
def stage1_run(tiny_zoo, synthetic_shards, tmp_path_factory):
    """One stage-1 step from the tiny bases; returns (config, result, parameters before training)."""
    out = tmp_path_factory.mktemp("stage1")
    cfg = stage_config(1, tiny_zoo, synthetic_shards, out, steps=1)
    before = model_params(load_model(cfg)[0])
    return cfg, train(cfg), before


def test_stage1_changes_exactly_the_main_unet_and_assign(stage1_run):
    cfg, result, before = stage1_run
    after = model_params(result.export_dir)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n in before if n.startswith("unet.")}
    assert any(".to_k_ip." in n for n in trainable) and any(".to_v_ip." in n for n in trainable)
    assert changed == trainable
    frozen = set(before) - trainable
    assert any(n.startswith("ip_adapter.image_proj.") for n in frozen)
    assert any(n.startswith("image_encoder.") for n in frozen)
    assert not any(n.startswith(("refinenet.", "detail_encoder.")) for n in after)  # no RefineNet in stage 1


def test_stage2_changes_exactly_refinenet_cross_attention_and_detail_mlp(stage1_run, tiny_zoo, synthetic_shards,
                                                                         tmp_path):
    _, result1, _ = stage1_run
    cfg = stage_config(2, tiny_zoo, synthetic_shards, tmp_path / "stage2", steps=1, pretrained=result1.export_dir)
    pipe, model = load_model(cfg)
    before = model_params(pipe)
    # RefineNet starts as a copy of the trained main UNet (conv_in: its first 4 input channels).
    unet = dict(model.unet.named_parameters())
    for name, p in model.refinenet.named_parameters():
        expected = unet[name][:, :4] if name == "conv_in.weight" else unet[name]
        assert torch.equal(p, expected), name
    result = train(cfg)
    after = model_params(result.export_dir)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, _ in model.trainable_parameters(2)}
    assert any(n.startswith("detail_encoder.") for n in trainable)
    assert all(n.startswith("detail_encoder.") or (n.startswith("refinenet.") and ".attn2." in n) for n in trainable)
    # Only RefineNet's decoder self-attention *inputs* reach the main UNet: the cross-attention of its
    # last decoder transformer block (after the last captured input) cannot, so it is not trainable.
    last_block = "refinenet.up_blocks.1.attentions.1.transformer_blocks.0.attn2."
    assert not any(n.startswith(last_block) for n in trainable)
    assert any(n.startswith("refinenet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.") for n in trainable)
    # Every returned parameter, and nothing else, changed.
    assert changed == trainable


def test_stage2_export_loads_and_runs_all_three_modes(stage1_run, tiny_zoo, synthetic_shards, tmp_path):
    from training.data import read_quadruplets

    _, result1, _ = stage1_run
    cfg = stage_config(2, tiny_zoo, synthetic_shards, tmp_path / "stage2", 1, "validation.every=1",
                       "validation.samples=1", "validation.num_inference_steps=2", pretrained=result1.export_dir)
    result = train(cfg)
    grid = Path(cfg.output.dir) / "validation" / "step-000001.png"
    assert grid.is_file()
    pipe = LARGenPipeline.from_pretrained(result.export_dir)
    assert pipe.model.has_refine
    q = read_quadruplets(synthetic_shards, 1)[0]
    modes = {}
    for prompt, subject in ((q.text, None), (None, q.subject), (q.text, q.subject)):
        out = pipe(image=q.source, mask_image=q.mask, prompt=prompt, subject_image=subject, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
        assert out.images[0].size == q.source.size
        modes[out.mode] = out.images[0]
    assert set(modes) == {"text", "subject", "text+subject"}


def test_resume_is_exact(tiny_zoo, synthetic_shards, tmp_path):
    extra = ("data.num_workers=2", "data.batch_size=1", "optim.gradient_accumulation_steps=2", "optim.ema.enabled=true",
             "optim.ema.decay=0.9")
    straight = train(stage_config(1, tiny_zoo, synthetic_shards, tmp_path / "a", 4, *extra))
    first = train(stage_config(1, tiny_zoo, synthetic_shards, tmp_path / "b", 2, *extra))
    second = train(stage_config(1, tiny_zoo, synthetic_shards, tmp_path / "b", 4, *extra),
                   resume_from_checkpoint="latest")
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    assert [Path(p).name for p in list_checkpoints(tmp_path / "b")][-1] == "checkpoint-4"
    a = load_file(str(tmp_path / "a" / "checkpoint-4" / TRAINABLE_WEIGHTS))
    b = load_file(str(tmp_path / "b" / "checkpoint-4" / TRAINABLE_WEIGHTS))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ema_a = load_file(str(tmp_path / "a" / "checkpoint-4" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "b" / "checkpoint-4" / "ema.safetensors"))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6


def test_a_shard_with_corrupt_members_trains_through(corrupt_shard, tiny_zoo, tmp_path):
    path, expected = corrupt_shard
    # 6 good samples, batch 2: step 4 reads into the second epoch, past every broken member.
    cfg = stage_config(1, tiny_zoo, [path], tmp_path / "run", 4, "data.resampled=false", "data.shuffle_buffer=1")
    result = train(cfg)
    assert result.step == 4
    assert result.skipped == expected
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["skipped"] == expected


def test_checkpoints_keep_the_last_n(tiny_zoo, synthetic_shards, tmp_path):
    cfg = stage_config(1, tiny_zoo, synthetic_shards, tmp_path / "run", 3, "checkpoint.every=1", "checkpoint.keep=2")
    train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-3"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_config_errors_name_the_key(tmp_path, capsys):
    stage1 = REPO / "training/configs/stage1.yaml"
    with pytest.raises(ConfigError, match="optim.learning_rat: unknown key"):
        load_train_config(stage1, ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match="data.dropout.text"):
        load_train_config(stage1, ["data.dropout.text=1.5"])
    with pytest.raises(ConfigError, match="data.dropout.both: unknown key"):
        load_train_config(stage1, ["data.dropout.both=0.1"])
    with pytest.raises(ConfigError, match="exactly one of model.pretrained"):
        load_train_config(stage1, ["model.pretrained=/x"])
    with pytest.raises(ConfigError, match="data.resolution"):
        load_train_config(stage1, ["data.resolution=500"])
    cfg = load_train_config(stage1, ["data.shards=/data/{000000..000003}.tar", "optim.learning_rate=5e-6"])
    assert cfg.data.shards == ["/data/{000000..000003}.tar"] and cfg.optim.learning_rate == 5e-6
    assert cfg.stage == 1 and cfg.model.beta == 1.0 and cfg.data.dropout.text == 0.2
    assert load_train_config(REPO / "training/configs/stage2.yaml").model.beta == 0.3
    assert main(["--config", str(stage1), "--set", "stage=3"]) == 2
    assert "stage" in capsys.readouterr().err
