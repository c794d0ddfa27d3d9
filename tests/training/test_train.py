"""The two-stage trainer on the tiny zoo: freezing per stage, exact resume, broken data, export, config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataengine.typed_config import ConfigError
from inference.pipeline import LARGenPipeline
from tests.training.conftest import write_undecodable_shard
from tests.training.resume import assert_resume_is_exact
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


def test_stage2_resume_is_exact(stage1_run, tiny_zoo, synthetic_shards, tmp_path):
    """Stage 2 (RefineNet, its noisy subject latents and detail tokens) resumes exactly."""
    export = stage1_run[1].export_dir
    assert_resume_is_exact(
        lambda out, steps: stage_config(2, tiny_zoo, synthetic_shards, out, steps, "checkpoint.every=1", pretrained=export),
        tmp_path, "refinenet.")


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


# ---------------------------------------------------------------- command-line errors, summary


def tiny_args(tiny_zoo: Path, shards: list[str], out: Path, *extra: str, steps: int = 1) -> list[str]:
    """`python -m training.train` arguments for a tiny stage-1 run from the zoo's pipeline."""
    sets = [f"data.shards={json.dumps(shards)}", "data.resolution=64", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=8", "data.shuffle_initial=4", f"optim.max_steps={steps}",
            "optim.lr_warmup_steps=0", "optim.mixed_precision=no", "optim.gradient_checkpointing=false",
            "optim.gradient_accumulation_steps=1", "validation.every=0", f"output.dir={out}", "model.base=null",
            f"model.pretrained={tiny_zoo / 'largen-pipeline'}", *extra]
    return ["--config", str(REPO / "training/configs/stage1.yaml"), *[a for s in sets for a in ("--set", s)]]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(("case", "expected"), [
    ("missing_config", "config file .*nope.yaml' does not exist"),
    ("config_is_a_folder", "config file .* is a folder"),
    ("config_is_binary", "config file .* is not a UTF-8 text"),
    ("config_not_yaml", "not valid YAML"),
    ("bad_set", "--set 'optim.max_steps': expected KEY=VALUE"),
    ("bad_value", "optim.max_steps: Input should be a valid integer"),
    ("unknown_key", "optim.learning_rat: unknown key"),
    ("no_shard", r"data.shards .*\{000000..000099\}.tar': no readable shard among 100: .*does not exist"),
    ("shard_not_a_tar", "data.shards .*: no readable shard among 1: .* is not a tar file"),
    ("resume_missing", "--resume_from_checkpoint .*checkpoint-7 does not exist"),
    ("output_is_a_file", "output.dir .* is an existing file, not a folder"),
    ("output_not_writable", "output.dir '/proc/largen-run' cannot be written"),
    ("output_under_a_file", "output.dir .* cannot be written .*NotADirectoryError"),
    ("pretrained_missing", "model.pretrained .*no-such-pipeline' does not exist"),
    ("pretrained_not_a_pipeline", "model.pretrained .* is not a LARGenPipeline folder"),
    ("stage2_without_stage1", "model.pretrained 'runs/stage1/final' does not exist; stage 2 starts from the stage-1"),
    ("base_missing", "model.base.inpaint .*no-such-base' is not a folder"),
])
def test_every_bad_input_is_one_line_and_exit_2(case, expected, tiny_zoo, synthetic_shards, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/stage1/final) resolve here, not in the repo
    out = tmp_path / "run"
    good = tiny_args(tiny_zoo, synthetic_shards, out)
    binary = tmp_path / "shard.tar"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "bad.yaml").write_text("stage: [1,\n")
    (tmp_path / "a-file").write_text("mine")
    argv = {
        "missing_config": ["--config", str(tmp_path / "nope.yaml")],
        "config_is_a_folder": ["--config", str(tmp_path)],
        "config_is_binary": ["--config", str(binary)],
        "config_not_yaml": ["--config", str(tmp_path / "bad.yaml")],
        "bad_set": [*good, "--set", "optim.max_steps"],
        "bad_value": [*good, "--set", "optim.max_steps=many"],
        "unknown_key": [*good, "--set", "optim.learning_rat=1"],
        "no_shard": [*good, "--set", f"data.shards={tmp_path}/release/v1/train/{{000000..000099}}.tar"],
        "shard_not_a_tar": [*good, "--set", f"data.shards={binary}"],
        "resume_missing": [*good, "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")],
        "output_is_a_file": [*good, "--set", f"output.dir={tmp_path / 'a-file'}"],
        "output_not_writable": [*good, "--set", "output.dir=/proc/largen-run"],
        "output_under_a_file": [*good, "--set", f"output.dir={tmp_path / 'a-file' / 'run'}"],
        "pretrained_missing": [*good, "--set", f"model.pretrained={tmp_path / 'no-such-pipeline'}"],
        "pretrained_not_a_pipeline": [*good, "--set", f"model.pretrained={tmp_path}"],
        "stage2_without_stage1": ["--config", str(REPO / "training/configs/stage2.yaml"),
                                  "--set", f"data.shards={json.dumps(synthetic_shards)}"],
        "base_missing": [*good, "--set", "model.pretrained=null", "--set",
                         f"model.base={{inpaint: {tmp_path / 'no-such-base'}}}"],
    }[case]
    assert main(argv) == 2
    assert re.search(expected, one_error_line(capsys)), expected
    if case != "output_is_a_file":
        assert not out.exists()  # nothing written before the inputs are known to be good
    assert (tmp_path / "a-file").read_text() == "mine"


def test_resume_from_another_stage_is_refused(stage1_run, tiny_zoo, synthetic_shards, tmp_path, capsys):
    cfg1, result1, _ = stage1_run
    checkpoint = list_checkpoints(Path(cfg1.output.dir))[-1]
    argv = ["--config", str(REPO / "training/configs/stage2.yaml"), "--set", f"data.shards={json.dumps(synthetic_shards)}",
            "--set", f"model.pretrained={result1.export_dir}", "--set", f"output.dir={tmp_path / 'stage2'}",
            "--resume_from_checkpoint", str(checkpoint)]
    assert main(argv) == 2
    assert "was written by stage 1, this run is stage 2" in one_error_line(capsys)


def test_the_documented_pattern_of_missing_shards_stops_at_once(tiny_zoo, tmp_path):
    """The issue: a pattern matching no file looped forever writing GBs of warnings. Now: one line, exit 2."""
    argv = tiny_args(tiny_zoo, ["release/v1/train/{000000..000099}.tar"], tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "training.train", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: data.shards"), proc.stderr
    assert "check the pattern against the file names" in lines[0]


def test_a_stream_that_fails_during_training_ends_in_one_line(tiny_zoo, tmp_path, capsys):
    # The shard reads (so the pre-flight check passes) but every sample in it is broken: the loader
    # stops after max_consecutive_failures, here inside 2 DataLoader workers.
    shard = tmp_path / "000000.tar"
    write_undecodable_shard(shard)
    argv = tiny_args(tiny_zoo, [str(shard)], tmp_path / "run", "data.num_workers=2",
                     "data.max_consecutive_failures=20")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]  # after the progress bar of the run that had started
    assert "Traceback" not in "".join(err) and not any(e.startswith("error") for e in err[:-1]), err
    assert line.startswith("error: data.shards: the data stream stopped: 20 shards/samples in a row failed")
    assert "decode" in line


def test_a_run_ends_with_its_summary(tiny_zoo, synthetic_shards, tmp_path, capsys):
    assert main(tiny_args(tiny_zoo, synthetic_shards, tmp_path / "run", steps=2)) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["steps_this_run"] == 2 and len(summary["losses"]) == 2
    assert summary["final_loss"] == pytest.approx(sum(summary["losses"]) / 2)
    assert summary["samples_per_second"] > 0 and summary["wall_seconds"] >= summary["loop_seconds"] > 0
    assert summary["export"] == str(tmp_path / "run" / "final")
    assert "stage 1 done: step 2/2 (2 this run)" in out
    assert f"final loss     {summary['final_loss']:.4f} (mean of the last 2 steps)" in out
    assert "samples/s" in out and "wall time" in out
    assert f"exported to    {tmp_path / 'run' / 'final'}" in out
