"""It learns: stage 1 on informative synthetic quadruplets lowers the loss and comes to use its conditions.

The short version of training/learning_check.py (the long one: `benchmarks/bench_train.py learn`;
figures in docs/training.md).
"""

from __future__ import annotations

import pytest
import torch

from training.learning_check import run_learning_check


@pytest.fixture()
def one_thread():
    # The tensors are tiny: one intra-op thread is as fast, and it does not spin against other jobs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_stage1_learns_and_uses_its_conditions(tiny_zoo, tmp_path, one_thread):
    report = run_learning_check(tiny_zoo / "largen-pipeline", tmp_path, steps=400, resolution=16, batch_size=16,
                                learning_rate=2e-3)
    # The training loss falls clearly.
    assert report["train_loss_last10"] < 0.6 * report["train_loss_first10"], report
    after = report["after"]
    assert after["all_true"] < 0.6 * report["before"]["all_true"], report
    # The trained model uses the caption and subject: true conditions beat shuffled ones on held-out data.
    assert after["all_true"] < after["all_shuffled"] - 0.01, report
    assert after["mask_true"] < after["mask_shuffled"], report
