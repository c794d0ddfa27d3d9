"""It learns: stage 1 comes to use each of its conditions, stage 2 trains RefineNet into a gain over Refine off.

Short versions of training/learning_check.py (`benchmarks/bench_train.py learn` runs them over
several seeds; the figures and how the thresholds were chosen are in docs/training.md, "It learns").
The thresholds are ratios of held-out losses with margins measured over seeds, not float bits.
"""

from __future__ import annotations

import pytest

from tests.threads import torch_threads
from training.learning_check import run_learning_check, run_refine_check

# One worker runs this module: both learning tests share the stage-1 run of the module fixture.
pytestmark = pytest.mark.xdist_group("learns")

# Thresholds on loss(true condition) / loss(shuffled condition) inside the hole, and Refine on / off,
# from 5 seeds (docs/training.md): each sits above the worst seed measured (stage 1: 0.63, stage 2:
# 0.950); this test's seed 0 measured 0.44 / 0.46 / 0.29 and 0.93 (detail ratio 0.970).
STAGE1_MAX_RATIO = 0.75  # each condition lowers the masked loss by at least 25 %
STAGE2_MAX_RATIO_VS_OFF = 0.985  # the trained RefineNet lowers it by more than 1.5 % (0.997 after 1 step)


@pytest.fixture(scope="module")
def stage1(tiny_zoo, tmp_path_factory):
    """One stage-1 run on the "colour" task, shared by both tests (stage 2 starts from its export)."""
    with torch_threads(1):
        return run_learning_check(tiny_zoo / "largen-pipeline", tmp_path_factory.mktemp("learns-stage1"))


@pytest.mark.slow
def test_stage1_learns_and_uses_each_condition(stage1):
    # The training loss falls clearly, and so does the held-out loss.
    assert stage1["train_loss_last10"] < 0.6 * stage1["train_loss_first10"], stage1
    assert stage1["after"]["both_true"] < 0.6 * stage1["before"]["both_true"], stage1
    # Before training no condition helps; after it, each one does, on its own: the caption with
    # the null image, the subject with the empty text, and both together.
    assert stage1["before"]["both_true"] > 0.9 * stage1["before"]["both_shuffled"], stage1
    for mode in ("text", "image", "both"):
        assert stage1["ratios"][mode] < STAGE1_MAX_RATIO, (mode, stage1)


@pytest.mark.slow
def test_stage2_trains_refinenet_into_a_gain(stage1, tmp_path_factory):
    with torch_threads(1):
        report = run_refine_check(stage1["export_dir"], tmp_path_factory.mktemp("learns-stage2"))
    # Refine lowers the masked loss against the same model with Refine off.
    assert report["ratios"]["refine_vs_off"] < STAGE2_MAX_RATIO_VS_OFF, report
    # RefineNet's own inputs (noisy subject latents, detail tokens) from another sample do not help.
    # That they clearly hurt, i.e. that the gain is this sample's detail, is NOT asserted: over 5 seeds
    # the ratio is 0.970-0.998 (docs/training.md). A whole-subject shuffle would pass through Assign.
    assert report["ratios"]["refine_vs_detail_shuffled"] < 1.002, report


def test_evaluation_loss_rejects_unknown_modes(tiny_zoo):
    from inference.pipeline import LARGenPipeline
    from training.train import evaluation_loss

    pipe = LARGenPipeline.from_pretrained(tiny_zoo / "largen-pipeline")
    for bad in ({"region": "hole"}, {"conditions": "subject"}, {"shuffle_conditions": "caption"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            evaluation_loss(pipe.model, pipe, [], stage=1, beta=1.0, **bad)
