"""RAM++ (dataengine.ram): strict loader, forward pass against a step-by-step reference, batching,
the published full-size key layout, the safetensors converter, and the tag stage on the tiny zoo."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from dataengine.config import ConfigError, load_run_config
from dataengine.engine import new_records
from dataengine.inputs import plan_shards
from dataengine.ram import convert
from dataengine.ram.checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_published,
    load_ram_plus,
    published_layout,
    published_to_model,
    read_published,
    save_converted,
)
from dataengine.ram.files import BUILTIN_TAG_LIST, BUILTIN_THRESHOLDS, read_tag_list, read_thresholds
from dataengine.ram.model import IMAGENET_MEAN, IMAGENET_STD, RamPlusConfig
from dataengine.ram.tagger import RamPlusTagger
from dataengine.stages.base import PENDING
from dataengine.stages.read import ReadStage
from dataengine.stages.tag import TagStage, require_ram
from dataengine.tiny_models import RAM_TINY_FILENAME, TINY_TAGS
from tests.threads import torch_threads

# The published file's keys and shapes (ram_plus_swin_large_14m.pth, from upstream's module
# definitions): ../shared/fixtures/ram-plus-swin-large-keys.json where that checkout has it, and
# always this digest of its sorted "key [shape]" lines, so the check also runs without it.
FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "ram-plus-swin-large-keys.json"
PUBLISHED_KEYS = 402
PUBLISHED_DIGEST = "aa14396e941abced6581f78e8acf7c0e81c6023744e72bc45c8ceaffe9bda910"


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ram_dir(tiny_zoo: Path) -> Path:
    return tiny_zoo / "ram-plus"


@pytest.fixture(scope="module")
def published(ram_dir: Path) -> dict[str, torch.Tensor]:
    return read_published(ram_dir / RAM_TINY_FILENAME)


@pytest.fixture(scope="module")
def tiny_config() -> RamPlusConfig:
    return RamPlusConfig.tiny(num_tags=len(TINY_TAGS))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]


@pytest.fixture(scope="module")
def tagger(ram_dir: Path) -> RamPlusTagger:
    return RamPlusTagger.load(ram_dir, threshold=0.0)


# --------------------------------------------------------------------------- strict loader


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.__setitem__("fc.bias_renamed", sd.pop("fc.bias")),
         [r"1 missing key\(s\): fc\.bias\b", r"1 unexpected key\(s\): fc\.bias_renamed"]),
        (lambda sd: sd.__setitem__("visual_encoder.layers.1.blocks.0.attn.qkv_fused.weight",
                                   sd.pop("visual_encoder.layers.1.blocks.0.attn.qkv.weight")),
         [r"missing key\(s\): visual_encoder\.layers\.1\.blocks\.0\.attn\.qkv\.weight",
          r"unexpected key\(s\): visual_encoder\.layers\.1\.blocks\.0\.attn\.qkv_fused\.weight"]),
        (lambda sd: sd.pop("tagging_head.encoder.layer.1.output.LayerNorm.bias"),
         [r"1 missing key\(s\): tagging_head\.encoder\.layer\.1\.output\.LayerNorm\.bias$"]),
        (lambda sd: sd.pop("visual_encoder.layers.0.blocks.1.attn_mask"),
         [r"missing key\(s\): visual_encoder\.layers\.0\.blocks\.1\.attn_mask$"]),
        (lambda sd: sd.__setitem__("text_alignment.weight", torch.zeros(2)),
         [r"1 unexpected key\(s\): text_alignment\.weight$"]),
        (lambda sd: sd.__setitem__("image_proj.bias", torch.zeros(3)),
         [r"key image_proj\.bias has shape \[3\], expected \[16\]"]),
    ],
    ids=["renamed", "renamed-swin", "missing", "missing-buffer", "extra", "shape"],
)  # fmt: skip
def test_loader_is_strict_and_names_the_key(published, tiny_config, edit, named):
    state = dict(published)
    edit(state)
    with pytest.raises(CheckpointError) as info:
        published_to_model(state, tiny_config, "'t.pth'")
    for pattern in named:
        assert any(re.search(pattern, part) for part in str(info.value).split("; ")), str(info.value)


def test_loader_maps_every_key_and_reads_files_only_as_checkpoints(published, tiny_config, ram_dir, tmp_path):
    mapped = published_to_model(published, tiny_config, "tiny")
    model = load_published(ram_dir / RAM_TINY_FILENAME)
    assert set(mapped) == set(model.state_dict())  # strict=True inside, so nothing is left unloaded either
    q, k, v = (mapped[f"visual_encoder.encoder.layers.2.blocks.1.attention.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(torch.cat([q, k, v]), published["visual_encoder.layers.2.blocks.1.attn.qkv.weight"])
    # a key no upstream module owns, reported in third-party conversions: dropped, as upstream does
    assert set(published_to_model({**published, "logit_scale": torch.tensor(1.0)}, tiny_config, "t")) == set(mapped)

    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"model\.pth' cannot be read"):
        load_published(bad, tiny_config)
    torch.save({"model": {"fc.weight": "a string"}}, tmp_path / "strings.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_published(tmp_path / "strings.pth", tiny_config)
    with pytest.raises(CheckpointError, match="no such file, or a folder without"):
        load_ram_plus(tmp_path / "nothing-here")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ram.pth").write_bytes((ram_dir / RAM_TINY_FILENAME).read_bytes())
    (foreign / "config.json").write_text('{"model_type": "swin"}')
    with pytest.raises(CheckpointError, match=r"config\.json': not a RAM\+\+ config written by lar-gen"):
        load_ram_plus(foreign)


def test_driver_check_reads_keys_not_weights(published, ram_dir, tmp_path):
    assert check_checkpoint(ram_dir) == ram_dir / RAM_TINY_FILENAME
    require_ram(ram_dir)
    folder = tmp_path / "renamed"
    folder.mkdir()
    (folder / "config.json").write_bytes((ram_dir / "config.json").read_bytes())
    state = dict(published)
    state["fc.bias_renamed"] = state.pop("fc.bias")
    torch.save({"model": state}, folder / "ram.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): fc\.bias; 1 unexpected key\(s\): fc\.bias_renamed"):
        check_checkpoint(folder)
    converted = tmp_path / "converted"
    save_converted(load_ram_plus(ram_dir), converted)
    assert check_checkpoint(converted) == converted / "model.safetensors"


# --------------------------------------------------------------------------- forward reference


def _upstream_relative_index(window: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).clone()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def _upstream_shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    regions = torch.zeros(1, side, side, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, hs, ws, :] = count
            count += 1
    n = side // window
    windows = regions.view(1, n, window, n, window, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _swin_block(x, sd, key, side, window, shift, heads):
    batch, length, dim = x.shape
    area, n = window * window, side // window
    h = F.layer_norm(x, (dim,), sd[key + "norm1.weight"], sd[key + "norm1.bias"], eps=1e-5).view(batch, side, side, dim)
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
    win = h.view(batch, n, window, n, window, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, area, dim)
    qkv = F.linear(win, sd[key + "attn.qkv.weight"], sd[key + "attn.qkv.bias"])
    q, k, v = qkv.view(-1, area, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
    index = _upstream_relative_index(window)
    assert torch.equal(index, sd[key + "attn.relative_position_index"])
    bias = sd[key + "attn.relative_position_bias_table"][index.view(-1)].view(area, area, heads).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if shift:
        mask = _upstream_shift_mask(side, window, shift)
        assert torch.equal(mask, sd[key + "attn_mask"])
        attn = (attn.view(batch, n * n, heads, area, area) + mask[None, :, None]).view(-1, heads, area, area)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, area, dim)
    out = F.linear(out, sd[key + "attn.proj.weight"], sd[key + "attn.proj.bias"])
    out = out.view(batch, n, n, window, window, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, side, side, dim)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(batch, length, dim)
    m = F.layer_norm(x, (dim,), sd[key + "norm2.weight"], sd[key + "norm2.bias"], eps=1e-5)
    m = F.gelu(F.linear(m, sd[key + "mlp.fc1.weight"], sd[key + "mlp.fc1.bias"]))
    return x + F.linear(m, sd[key + "mlp.fc2.weight"], sd[key + "mlp.fc2.bias"])


def _patch_merge(x, sd, key, side):
    batch, _, dim = x.shape
    g = x.view(batch, side, side, dim)
    cat = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1).view(batch, -1, 4 * dim)
    cat = F.layer_norm(cat, (4 * dim,), sd[key + "norm.weight"], sd[key + "norm.bias"], eps=1e-5)
    return F.linear(cat, sd[key + "reduction.weight"])


def _bert_norm(x, sd, key):
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps=1e-12)


def reference_logits(sd: dict[str, torch.Tensor], cfg: RamPlusConfig, pixels: torch.Tensor) -> torch.Tensor:
    """RAM++'s forward pass written out from upstream's semantics, on the published-layout weights."""
    ve = "visual_encoder."
    x = F.conv2d(pixels, sd[ve + "patch_embed.proj.weight"], sd[ve + "patch_embed.proj.bias"], stride=cfg.patch_size)
    batch, dim, side, _ = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (dim,), sd[ve + "patch_embed.norm.weight"],
                     sd[ve + "patch_embed.norm.bias"], eps=1e-5)  # fmt: skip
    for i, depth in enumerate(cfg.depths):
        window = min(cfg.window_size, side)
        for j in range(depth):
            shift = window // 2 if j % 2 == 1 and side > cfg.window_size else 0
            x = _swin_block(x, sd, f"{ve}layers.{i}.blocks.{j}.", side, window, shift, cfg.num_heads[i])
        if i < len(cfg.depths) - 1:
            x = _patch_merge(x, sd, f"{ve}layers.{i}.downsample.", side)
            side //= 2
    x = F.layer_norm(x, (x.shape[-1],), sd[ve + "norm.weight"], sd[ve + "norm.bias"], eps=1e-5)
    tokens = F.linear(torch.cat([x.mean(1, keepdim=True), x], 1), sd["image_proj.weight"], sd["image_proj.bias"])

    pooled = tokens[:, 0] / tokens[:, 0].norm(dim=-1, keepdim=True)
    tags, per_tag = cfg.num_tags, cfg.descriptions_per_tag
    weights = (sd["reweight_scale"].exp() * pooled @ sd["label_embed"].t()).view(batch, tags, per_tag).softmax(-1)
    descriptions = sd["label_embed"].view(tags, per_tag, -1)
    mixed = torch.stack([(weights[b].unsqueeze(-1) * descriptions).sum(1) for b in range(batch)])
    q = F.relu(F.linear(mixed, sd["wordvec_proj.weight"], sd["wordvec_proj.bias"]))
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = hidden // heads

    def split(t):
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    for layer in range(cfg.num_layers):
        key = f"tagging_head.encoder.layer.{layer}."
        a = key + "crossattention."
        query = split(F.linear(q, sd[a + "self.query.weight"], sd[a + "self.query.bias"]))
        keys = split(F.linear(tokens, sd[a + "self.key.weight"], sd[a + "self.key.bias"]))
        values = split(F.linear(tokens, sd[a + "self.value.weight"], sd[a + "self.value.bias"]))
        probs = (query @ keys.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        context = (probs @ values).transpose(1, 2).reshape(batch, -1, hidden)
        attended = _bert_norm(F.linear(context, sd[a + "output.dense.weight"], sd[a + "output.dense.bias"]) + q, sd,
                              a + "output.LayerNorm")  # fmt: skip
        inner = F.gelu(F.linear(attended, sd[key + "intermediate.dense.weight"], sd[key + "intermediate.dense.bias"]))
        q = _bert_norm(F.linear(inner, sd[key + "output.dense.weight"], sd[key + "output.dense.bias"]) + attended, sd,
                       key + "output.LayerNorm")  # fmt: skip
    return F.linear(q, sd["fc.weight"], sd["fc.bias"]).squeeze(-1)


def test_forward_matches_the_step_by_step_reference(published, tagger, tiny_config, images):
    pixels = tagger.preprocess(images)
    with torch.inference_mode():
        ours = tagger.model(pixels)
        ref = reference_logits(published, tiny_config, pixels)
    assert ours.shape == (3, len(TINY_TAGS))
    # measured max |diff| 1.6e-5 (fused vs explicit attention, einsum vs loop); logits spread over units
    assert (ours - ref).abs().max() < 1e-4
    assert ref.std() > 0.5


def test_preprocess_is_upstreams(tagger):
    gray = Image.new("RGB", (300, 200), (128, 64, 255))
    pixels = tagger.preprocess([gray])
    assert pixels.shape == (1, 3, 64, 64)
    expected = (np.array([128, 64, 255]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(pixels[0, :, 10, 10].numpy(), expected, atol=1e-5)


def test_batched_tagging_equals_one_image_at_a_time(tagger, images):
    batched = tagger.probabilities(images)
    alone = torch.cat([tagger.probabilities([image]) for image in images])
    assert (batched - alone).abs().max() < 5e-5  # measured 3.4e-6
    ranked = tagger(images)
    assert [[t for t, _ in r] for r in ranked] == [[t for t, _ in tagger([image])[0]] for image in images]
    for row in ranked:
        assert [p for _, p in row] == sorted((p for _, p in row), reverse=True)
        assert len(row) == len(TINY_TAGS) and set(t for t, _ in row) == set(TINY_TAGS)  # threshold 0: every tag


def test_per_tag_thresholds_decide_when_no_single_threshold(ram_dir, tagger, images):
    per_tag = RamPlusTagger.load(ram_dir)
    probs = tagger.probabilities(images)
    thresholds = read_thresholds(ram_dir / "tag_thresholds.txt", len(TINY_TAGS), 0.68)
    for row, result in zip(probs, per_tag(images)):
        expected = {TINY_TAGS[i] for i in range(len(TINY_TAGS)) if row[i] > thresholds[i]}
        assert {t for t, _ in result} == expected


# --------------------------------------------------------------------------- the published layout


def _lines(layout: dict[str, tuple[int, ...]]) -> list[str]:
    return sorted(f"{key} {list(shape)}" for key, shape in layout.items())


def test_full_size_model_has_the_published_keys_and_shapes():
    layout = published_layout(RamPlusConfig.full())  # built on the meta device: no weights allocated
    lines = _lines(layout)
    assert len(lines) == PUBLISHED_KEYS
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == PUBLISHED_DIGEST
    assert layout["label_embed"] == (4585 * 51, 512)
    assert layout["visual_encoder.layers.2.blocks.17.attn.qkv.weight"] == (2304, 768)
    if not FIXTURE.is_file():
        return
    fixture = json.loads(FIXTURE.read_text())
    assert lines == _lines({k["key"]: tuple(k["shape"]) for k in fixture["keys"]})
    # the fixture's own transformers names for each Swin key agree with the loader's map
    meta = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    mapped = published_to_model(meta, RamPlusConfig.full(), "meta")
    checked = 0
    for entry in fixture["keys"]:
        names = entry["transformers"].get("v5")
        if names and entry["transformers"]["transformers"] == "SwinModel":
            assert all(f"visual_encoder.{n}" in mapped for n in names), entry["key"]
            checked += 1
    assert checked == 327  # every Swin parameter: 402 keys - 35 derived buffers - 40 outside the encoder


def test_bundled_tag_files_are_upstreams():
    tags = read_tag_list(BUILTIN_TAG_LIST, expected=4585)
    thresholds = read_thresholds(BUILTIN_THRESHOLDS, 4585, 0.68)
    assert set(TINY_TAGS) <= set(tags)
    assert tags[:2] == ["3D CG rendering", "3D glasses"] and tags[-1] == "zoo"
    assert min(thresholds) == 0.45 and max(thresholds) == 1.0 and thresholds[0] == 0.65
    require_ram()


# --------------------------------------------------------------------------- converter


def test_convert_round_trip_same_outputs_and_no_pickle(ram_dir, tagger, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "converted"
    assert convert.main(["convert", str(ram_dir), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tag_list.txt",
                                                     "tag_thresholds.txt"]  # fmt: skip

    def no_pickle(*args, **kwargs):
        raise AssertionError("unpickled while loading a converted folder")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    again = RamPlusTagger.load(out, threshold=0.0)
    monkeypatch.undo()
    assert again.tags == tagger.tags and torch.equal(again.thresholds, tagger.thresholds)
    assert torch.equal(again.probabilities(images), tagger.probabilities(images))

    # a second conversion into the same folder is refused, and the folder is left as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert convert.main(["convert", str(ram_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: OUT: output" in err and "is not an empty folder" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert convert.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m dataengine.ram: error: CKPT: ") and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_convert_trust_pickle_is_opt_in(ram_dir, tmp_path, capsys):
    folder = tmp_path / "with-args"
    folder.mkdir()
    for name in ("config.json", "tag_list.txt", "tag_thresholds.txt"):
        (folder / name).write_bytes((ram_dir / name).read_bytes())
    state = read_published(ram_dir / RAM_TINY_FILENAME)
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, folder / "ram.pth")  # not plain data
    assert convert.main(["convert", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read: UnpicklingError" in err and "convert --trust-pickle" in err and "\x1b" not in err
    assert not (tmp_path / "out").exists()
    assert convert.main(["convert", "--trust-pickle", str(folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_save_converted_refuses_a_non_empty_folder(ram_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_converted(load_ram_plus(ram_dir), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- config and tag stage


def test_profiles_resolve_the_tagger_of_the_backend(repo_root, tiny_zoo, tmp_path):
    pipelines = repo_root / "pipelines.yaml"
    full = load_run_config(pipelines, "default", profile="full")
    assert full.pipeline.tag.backend == "ram" and full.profile.tagger == "xinyu1205/recognize-anything-plus-model"
    clip = load_run_config(pipelines, "sample", overrides=["tag.backend=clip"])
    assert clip.profile.tagger == clip.profile.clip == str(tiny_zoo / "clip-tagger")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"profiles\.tiny\.tagger: local file or folder .*empty' holds no RAM\+\+"):
        load_run_config(pipelines, "sample", overrides=[f"profiles.tiny.tagger={empty}"])
    with pytest.raises(ConfigError, match=r"profiles\.tiny\.tagger: local file or folder .*gone' does not exist"):
        load_run_config(pipelines, "sample", overrides=[f"profiles.tiny.tagger={tmp_path / 'gone'}"])


def test_tag_stage_with_ram_on_the_tiny_zoo(sample_cfg, tagger):
    assert sample_cfg.pipeline.tag.backend == "ram"
    shard = plan_shards(sample_cfg.pipeline.inputs)[0]
    stage = TagStage(sample_cfg)
    records = stage.run(ReadStage(sample_cfg).run(new_records(shard)))
    top_k = sample_cfg.pipeline.tag.top_k
    for record in records:
        assert record.status == PENDING and len(record.tags) == top_k
        expected = [t for t, _ in tagger([Image.fromarray(record.image)])[0] if t != "sky"][:top_k]
        assert record.tags == expected
    assert sum(r.drops["non_entity_tag"] for r in records) == len(records)  # "sky" passes threshold 0 and is dropped

    strict = sample_cfg.model_copy(deep=True)
    strict.pipeline.tag = strict.pipeline.tag.model_copy(update={"ram_threshold": None})
    per_tag = TagStage(strict).run(ReadStage(strict).run(new_records(shard)))
    for record in per_tag:
        assert record.drops["no_tags"] == 1 if not record.tags else 0 < len(record.tags) <= top_k
