"""The benchmark: the seeded selection rules, the COCO + DreamBooth build (cut-outs by the engine's
ground + segment stages on the tiny zoo, a hand-made mask overriding one), the synthetic build, and
bad input: one line naming the path, exit status 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.benchmark import (
    CASE_COLUMNS,
    PROMPTS,
    BenchmarkError,
    build_synthetic,
    case_seed,
    dreambooth_root,
    load_cases,
    select_scenes,
    select_subjects,
)
from inference.cli import main
from tests.evaluation.fakes import COCO_CANDIDATES, write_coco, write_dreambooth


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakes")
    return write_coco(root / "coco"), write_dreambooth(root / "dreambooth")


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["eval", *argv])
    return code, capsys.readouterr().err


def test_scene_rule_is_seeded_and_documented(fakes):
    coco, _ = fakes
    ann = coco / "annotations" / "instances_val2017.json"
    picked = select_scenes(ann, 3, seed=0)
    assert picked == select_scenes(ann, 3, seed=0)
    for info, annotation in picked:
        x, y, w, h = annotation["bbox"]
        assert (x, y, x + w, y + h) == COCO_CANDIDATES[info["id"]]  # crowd, too small, too big: never; the larger box
    ids = [info["id"] for info, _ in picked]
    assert ids == sorted(ids)
    all_five = {info["id"] for info, _ in select_scenes(ann, 5, seed=0)}
    assert all_five == set(COCO_CANDIDATES)
    assert any([i["id"] for i, _ in select_scenes(ann, 3, seed=s)] != ids for s in range(1, 6))
    with pytest.raises(BenchmarkError, match="only 5 image"):
        select_scenes(ann, 6, seed=0)


def test_subject_rule(fakes):
    _, dreambooth = fakes
    root = dreambooth_root(dreambooth.parent)  # the repository root works as well as dataset/
    chosen = select_subjects(root, 1, seed=0)
    assert [s.kind for s in chosen] == ["live", "non-live"]
    assert chosen == select_subjects(root, 1, seed=0)
    assert all(s.photo.name == "00.jpg" for s in chosen)
    named = select_subjects(root, 1, seed=0, names=["teapot", "dog2"])
    assert [(s.name, s.class_noun, s.kind) for s in named] == [("teapot", "teapot", "non-live"), ("dog2", "dog", "live")]
    assert case_seed(0, "a") == case_seed(0, "a") != case_seed(1, "a")


def test_coco_build_cuts_subjects_with_the_engine_and_honours_hand_made_masks(fakes, tmp_path, capsys):
    coco, dreambooth = fakes
    masks = tmp_path / "masks"
    masks.mkdir()
    hand = np.zeros((64, 72), dtype=np.uint8)
    hand[10:40, 20:50] = 255
    Image.fromarray(hand).save(masks / "teapot.png")
    out = tmp_path / "bench"
    code, err = _cli(capsys, "build", "--coco", str(coco), "--dreambooth", str(dreambooth), "--out", str(out),
                     "--scenes", "2", "--prompts", "2", "--subjects", "cat,teapot", "--masks", str(masks),
                     "--pipeline", "sample", "--profile", "tiny")
    assert code == 0, err
    meta = json.loads((out / "benchmark.json").read_text())
    assert {s["name"]: s["cut"] for s in meta["subjects"]} == {"cat": "ground+segment", "teapot": "hand-made"}
    crops = {s["name"]: s["crop"] for s in meta["subjects"]}
    cases = load_cases(out)
    assert len(cases) == 2 * 2 * 2
    assert set(pq.read_table(out / "cases.parquet").column_names) == set(CASE_COLUMNS)
    assert {c["prompt"] for c in cases if c["subject"] == "cat"} == {p.replace("S*", "cat") for p in PROMPTS["live"][:2]}
    assert len({c["seed"] for c in cases}) == len(cases)
    for name in ("cat", "teapot"):
        cut = Image.open(out / "subjects" / f"{name}.png")
        mask = np.asarray(Image.open(out / "subject_masks" / f"{name}.png")) >= 128
        assert cut.mode == "RGBA" and mask.shape == (64, 72)
        x0, y0, x1, y1 = crops[name]
        assert cut.size == (x1 - x0, y1 - y0)
        assert np.array_equal(np.asarray(cut.getchannel("A")) >= 128, mask[y0:y1, x0:x1])  # alpha = the mask
        assert (out / "subject_sources" / f"{name}.jpg").is_file()
    assert np.array_equal(np.asarray(Image.open(out / "subject_masks" / "teapot.png")), hand)
    scene = Image.open(out / cases[0]["scene_path"])
    assert scene.size == (200, 150) and cases[0]["scene_path"].startswith("scenes/coco")
    # An existing benchmark is never replaced without --overwrite.
    code, err = _cli(capsys, "build", "--synthetic", "--out", str(out))
    assert code == 2 and "--overwrite" in err and len(load_cases(out)) == 8


def test_synthetic_build_is_deterministic(tmp_path):
    a = build_synthetic(tmp_path / "a", scenes=2, prompts_per_subject=3, size=64)
    b = build_synthetic(tmp_path / "b", scenes=2, prompts_per_subject=3, size=64)
    cases = load_cases(a)
    assert cases == load_cases(b) and len(cases) == 2 * 2 * 3
    assert {c["kind"] for c in cases} == {"live", "non-live"}
    for case in cases:
        x0, y0, x1, y1 = case["box"]
        w, h = Image.open(a / case["scene_path"]).size
        assert max(w, h) == 64 and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert Image.open(a / case["subject_path"]).mode == "RGBA"


@pytest.mark.parametrize(
    "setup, argv, expect",
    [
        ("no-ann", ["--scenes", "1"], "instances_val2017.json"),
        ("no-subject", ["--subjects", "cat,vase"], "vase"),
        ("bad-image", ["--scenes", "5"], "000000000005.jpg"),
    ],
)
def test_bad_build_input_is_one_line(fakes, tmp_path, capsys, setup, argv, expect):
    import shutil

    coco = shutil.copytree(fakes[0], tmp_path / "coco")
    dreambooth = shutil.copytree(fakes[1], tmp_path / "db")
    if setup == "no-ann":
        (coco / "annotations" / "instances_val2017.json").unlink()
    elif setup == "no-subject":
        shutil.rmtree(dreambooth / "vase")
    else:
        (coco / "val2017" / "000000000005.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "bench"
    code, err = _cli(capsys, "build", "--coco", str(coco), "--dreambooth", str(dreambooth), "--out", str(out),
                     "--profile", "tiny", "--pipeline", "sample", "--subjects-per-kind", "1", *argv)
    assert code == 2
    assert err.startswith("largen: error: ") and err.count("\n") == 1 and expect in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bench")]
