"""pipelines.yaml: the shipped file validates, overrides are typed, bad configs name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dataengine.config import load_project, load_run_config
from dataengine.typed_config import ConfigError


@pytest.fixture()
def config_file(repo_root: Path, tmp_path: Path):
    """Write a variant of the shipped pipelines.yaml; `edit(data)` mutates the parsed dict."""

    def write(edit=None) -> Path:
        data = yaml.safe_load((repo_root / "pipelines.yaml").read_text())
        if edit:
            edit(data)
        path = tmp_path / "pipelines.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def test_shipped_config_validates(repo_root: Path):
    project = load_project(repo_root / "pipelines.yaml")
    assert {"full", "tiny"} <= set(project.profiles)
    assert project.profiles["full"].grounding == "IDEA-Research/grounding-dino-base"
    assert project.profiles["full"].image_prompt.weight_name == "ip-adapter-plus_sd15.safetensors"
    for pipe in project.pipelines.values():
        assert pipe.profile in project.profiles


def test_full_profile_keeps_hub_ids(repo_root: Path):
    run = load_run_config(repo_root / "pipelines.yaml", "default", profile="full")
    assert run.profile.segmenter == "facebook/sam-vit-huge"
    assert run.pipeline.ground.box_threshold == 0.25
    assert run.pipeline.ground.text_threshold == 0.2


def test_tiny_profile_resolves_to_existing_folders(repo_root: Path, tiny_zoo: Path):
    run = load_run_config(repo_root / "pipelines.yaml", "default", profile="tiny")
    assert Path(run.profile.grounding).is_dir()
    assert Path(run.profile.grounding).parent == tiny_zoo
    assert Path(run.profile.image_prompt.repo).is_dir()


def test_set_overrides_are_typed(repo_root: Path):
    run = load_run_config(
        repo_root / "pipelines.yaml",
        "default",
        overrides=["ground.box_threshold=0.4", "tag.exclude=[sky, wall]", "pipelines.default.filter.max_instances=3"],
    )
    assert run.pipeline.ground.box_threshold == 0.4
    assert run.pipeline.tag.exclude == ["sky", "wall"]
    assert run.pipeline.filter.max_instances == 3


def test_config_hash_is_stable_and_sensitive(repo_root: Path):
    a = load_run_config(repo_root / "pipelines.yaml", "default")
    b = load_run_config(repo_root / "pipelines.yaml", "default")
    c = load_run_config(repo_root / "pipelines.yaml", "default", overrides=["ground.nms_iou=0.6"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


BAD_CONFIGS = [
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("ground", {}).update(box_treshold=0.3),
        r"pipelines\.default\.ground\.box_treshold: unknown key; allowed keys: box_threshold, text_threshold, nms_iou",
        id="unknown-key",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("ground", {}).update(box_threshold="high"),
        r"pipelines\.default\.ground\.box_threshold: Input should be a valid number.*'high'",
        id="wrong-type",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("ground", {}).update(box_threshold=1.5),
        r"pipelines\.default\.ground\.box_threshold: Input should be less than or equal to 1 \(got 1\.5\)",
        id="out-of-range",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("tag", {}).update(backend="blip"),
        r"pipelines\.default\.tag\.backend: Input should be 'clip' or 'ram' \(got 'blip'\)",
        id="bad-choice",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"]["inputs"][0].update(kind="folder"),
        r"pipelines\.default\.inputs\.0\.kind: Input should be 'images', 'webdataset' or 'table'",
        id="bad-input-kind",
    ),
    pytest.param(
        lambda d: d["profiles"]["full"].pop("segmenter"),
        r"profiles\.full\.segmenter: required key is missing",
        id="missing-model",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].update(profile="huge"),
        r"pipeline 'default' uses profile 'huge'; defined profiles: full, tiny",
        id="unknown-profile",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("caption", {}).update(prompt="Describe this."),
        r"pipelines\.default\.caption\.prompt: .*must contain the placeholder \{tag\}",
        id="caption-without-tag",
    ),
    pytest.param(
        lambda d: d["pipelines"]["default"].setdefault("filter", {}).update(min_box_area_frac=0.9, max_box_area_frac=0.5),
        r"min_box_area_frac \(0\.9\) must not exceed max_box_area_frac \(0\.5\)",
        id="inverted-bounds",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CONFIGS)
def test_bad_config_names_the_key(config_file, edit, message):
    path = config_file(edit)
    with pytest.raises(ConfigError, match=message):
        load_project(path)


def test_missing_local_model_path_fails_at_load(config_file, tmp_path):
    missing = tmp_path / "no-such-model"
    path = config_file(lambda d: d["profiles"]["full"].update(grounding=str(missing)))
    with pytest.raises(ConfigError, match=r"profiles\.full\.grounding: local model folder .*no-such-model.* does not exist"):
        load_run_config(path, "default", profile="full")


def test_unknown_pipeline_and_profile_list_the_choices(repo_root: Path):
    with pytest.raises(ConfigError, match=r"pipeline 'nope' is not defined; defined pipelines: default"):
        load_run_config(repo_root / "pipelines.yaml", "nope")
    with pytest.raises(ConfigError, match=r"profile 'nope' is not defined; defined profiles: full, tiny"):
        load_run_config(repo_root / "pipelines.yaml", "default", profile="nope")


def test_bad_set_override_is_rejected(repo_root: Path):
    with pytest.raises(ConfigError, match=r"--set 'ground\.box_threshold': expected KEY=VALUE"):
        load_run_config(repo_root / "pipelines.yaml", "default", overrides=["ground.box_threshold"])
    with pytest.raises(ConfigError, match=r"pipelines\.default\.ground\.nms: unknown key"):
        load_run_config(repo_root / "pipelines.yaml", "default", overrides=["ground.nms=0.3"])
    with pytest.raises(ConfigError, match=r"pipelines\.default\.ground\.box_threshold: Input should be a valid number"):
        load_run_config(repo_root / "pipelines.yaml", "default", overrides=["ground.box_threshold=abc"])


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_project(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- `--set` into lists


def test_set_indexes_into_a_list_of_pipelines_yaml(repo_root: Path):
    run = load_run_config(
        repo_root / "pipelines.yaml",
        "sample",
        profile="full",
        overrides=["inputs.0.images_per_shard=3", "pipelines.sample.inputs.0.path=/data/photos"],
    )
    assert run.pipeline.inputs[0].images_per_shard == 3
    assert run.pipeline.inputs[0].path == "/data/photos"
    assert run.pipeline.inputs[0].kind == "images"  # the rest of the item is kept


def test_set_indexes_into_a_list_of_a_training_config(repo_root: Path):
    from training.config import load_train_config

    stage1 = repo_root / "training" / "configs" / "stage1.yaml"
    cfg = load_train_config(stage1, ["data.shards.0=/data/release/{000000..000009}.tar"])
    assert cfg.data.shards == ["/data/release/{000000..000009}.tar"]
    with pytest.raises(ConfigError, match=r"--set data\.shards\.1: index 1 is out of range: 'data\.shards' is a list of 1 item"):
        load_train_config(stage1, ["data.shards.1=/x.tar"])
    with pytest.raises(ConfigError, match=r"'data\.shards\.0' is a value .*not a section"):
        load_train_config(stage1, ["data.shards.0.path=/x.tar"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inputs.1.images_per_shard=3",
         r"^--set pipelines\.sample\.inputs\.1: index 1 is out of range: 'pipelines\.sample\.inputs' is a list of 1 item "
         r"\(indexes 0 to 0\)$"),
        ("inputs.-1.images_per_shard=3", r"^--set pipelines\.sample\.inputs\.-1: index -1 is out of range: .* list of 1 item"),
        ("inputs.first.images_per_shard=3", r"^--set pipelines\.sample\.inputs\.first: .* list of 1 item: 'first' is not an index"),
        ("inputs.0.images_per_shard=many",
         r"^.*pipelines\.yaml: pipelines\.sample\.inputs\.0\.images_per_shard: Input should be a valid integer"),
        ("inputs.0.images_per_shard=0",
         r"pipelines\.sample\.inputs\.0\.images_per_shard: Input should be greater than or equal to 1 \(got 0\)"),
        ("inputs.0.folder=/x", r"pipelines\.sample\.inputs\.0\.folder: unknown key; allowed keys: kind, path"),
    ],
)  # fmt: skip
def test_bad_list_index_names_the_key_and_the_length(repo_root: Path, override: str, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(repo_root / "pipelines.yaml", "sample", profile="full", overrides=[override])
    assert "\n" not in str(info.value)


def test_unreadable_configs_are_one_line_errors(tmp_path: Path, monkeypatch):
    from dataengine.typed_config import read_yaml

    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file"):
        read_yaml(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match=r"is not a UTF-8 text \(YAML\) file"):
        read_yaml(binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(bad)
    assert "\n" not in str(info.value) and "at line 2, column 1" in str(info.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: 1\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads a chmod 000 file, so simulate the refusal
    with pytest.raises(ConfigError, match=r"ok\.yaml' cannot be read: Permission denied"):
        read_yaml(ok)


def test_ram_tagger_is_a_checkpoint_file_or_a_folder_holding_one(repo_root: Path, tmp_path: Path):
    checkpoint = tmp_path / "ram_plus_swin_large_14m.pth"
    checkpoint.write_bytes(b"weights")
    for ref in (checkpoint, tmp_path):  # the file, or a folder holding it
        run = load_run_config(repo_root / "pipelines.yaml", "default", profile="full",
                              overrides=["tag.backend=ram", f"profiles.full.tagger={ref}"])  # fmt: skip
        assert run.profile.tagger == str(ref)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"profiles\.full\.tagger: local file or folder .*empty' holds no RAM\+\+ checkpoint"):
        load_run_config(repo_root / "pipelines.yaml", "default", profile="full",
                        overrides=["tag.backend=ram", f"profiles.full.tagger={tmp_path / 'empty'}"])  # fmt: skip
