"""Read and write RAM++ checkpoints: the published `.pth` (strict key map) and the safetensors conversion.

The published `ram_plus_swin_large_14m.pth` is `{"model": state_dict}` with upstream's module
names. Its Swin keys follow Microsoft's Swin code (`patch_embed`, `attn.qkv`, `norm1`, ...); they
are mapped onto transformers' `SwinModel` names, the fused `qkv` split into `q_proj` / `k_proj` /
`v_proj`. The file also stores two kinds of derived Swin buffers (`relative_position_index`,
`attn_mask`) that SwinModel rebuilds from its config: their shapes are checked and they are dropped
(upstream drops them too). Every other key keeps its name. Loading is strict: the key set must
equal the layout `published_layout(config)` derives from the model, shapes included, or the error
names the offending keys.

`save_converted` writes a folder (model.safetensors with this package's module names,
config.json, tag list, thresholds) that `load_converted` reads back without unpickling anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dataengine.models import ModelLoadError
from dataengine.ram.files import (
    BUILTIN_TAG_LIST,
    BUILTIN_THRESHOLDS,
    CONFIG_NAME,
    HUB_REPO,
    PUBLISHED_FILENAME,
    TAG_LIST_NAME,
    THRESHOLDS_NAME,
    WEIGHTS_NAME,
    TagListError,
    checkpoint_in,
    read_tag_list,
    read_thresholds,
)
from dataengine.ram.model import RamPlus, RamPlusConfig

FORMAT = "lar-gen-ram-plus/1"

# Reported in third-party conversions of the published file, but no module of upstream's RAM_plus
# owns it (upstream loads with strict=False, so it would be ignored there too): dropped if present.
UNUSED_PUBLISHED_KEYS = frozenset({"logit_scale"})

# published name template -> SwinModel name template, under `visual_encoder.`; {i} stage, {j} block,
# {p} weight|bias. The fused qkv and the derived buffers are handled apart.
_SWIN_RENAMES = [
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("patch_embed.norm.{p}", "embeddings.norm.{p}"),
    ("layers.{i}.blocks.{j}.norm1.{p}", "encoder.layers.{i}.blocks.{j}.layernorm_before.{p}"),
    ("layers.{i}.blocks.{j}.norm2.{p}", "encoder.layers.{i}.blocks.{j}.layernorm_after.{p}"),
    ("layers.{i}.blocks.{j}.attn.proj.{p}", "encoder.layers.{i}.blocks.{j}.attention.o_proj.{p}"),
    ("layers.{i}.blocks.{j}.attn.relative_position_bias_table",
     "encoder.layers.{i}.blocks.{j}.attention.relative_position_bias.relative_position_bias_table"),
    ("layers.{i}.blocks.{j}.mlp.fc1.{p}", "encoder.layers.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("layers.{i}.blocks.{j}.mlp.fc2.{p}", "encoder.layers.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("layers.{i}.downsample.reduction.weight", "encoder.layers.{i}.downsample.reduction.weight"),
    ("layers.{i}.downsample.norm.{p}", "encoder.layers.{i}.downsample.norm.{p}"),
    ("norm.{p}", "layernorm.{p}"),
]  # fmt: skip
_QKV = ("layers.{i}.blocks.{j}.attn.qkv.{p}", "encoder.layers.{i}.blocks.{j}.attention.{x}_proj.{p}")
_REL_INDEX = "layers.{i}.blocks.{j}.attn.relative_position_index"
_ATTN_MASK = "layers.{i}.blocks.{j}.attn_mask"
_PREFIX = "visual_encoder."
_GROUPS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)", "x": r"(?P<x>[qkv])"}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(_PREFIX + template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_TO_MODEL = [(_regex(pub), _PREFIX + mod) for pub, mod in _SWIN_RENAMES]
_TO_PUBLISHED = [(_regex(mod), _PREFIX + pub) for pub, mod in _SWIN_RENAMES]
_QKV_PUBLISHED, _QKV_MODEL = _regex(_QKV[0]), _regex(_QKV[1])
_DERIVED = [_regex(_REL_INDEX), _regex(_ATTN_MASK)]


class CheckpointError(ModelLoadError):
    """A RAM++ checkpoint is missing, unreadable, or does not match the model (names the keys)."""


@dataclass
class LoadedRamPlus:
    """A RAM++ model in eval mode with its tag list and per-tag thresholds (line i = output i)."""

    model: RamPlus
    tags: list[str]
    thresholds: list[float]
    source: str


# --------------------------------------------------------------------------- key layout


def _published_name(model_key: str) -> str | None:
    for pattern, template in _TO_PUBLISHED:
        match = pattern.match(model_key)
        if match:
            return template.format(**match.groupdict())
    return None


def _swin_blocks(config: RamPlusConfig):
    """(stage, block, window, grid side, shifted) of every Swin block, as upstream sizes them."""
    grid = config.image_size // config.patch_size
    for i, depth in enumerate(config.depths):
        side = grid // 2**i
        window = min(config.window_size, side)
        for j in range(depth):
            shifted = j % 2 == 1 and side > config.window_size
            yield i, j, window, side, shifted


def published_layout(config: RamPlusConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a published-layout RAM++ checkpoint of this size, with its shape.

    Derived from the model itself (built on the meta device, no memory), through the inverse of the
    loader's key map, plus the Swin buffers upstream saves: the full-size result is what the
    published file holds.
    """
    with torch.device("meta"):
        model = RamPlus(config)
    layout: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        qkv = _QKV_MODEL.match(key)
        if qkv:
            if qkv["x"] == "q":
                name = _PREFIX + _QKV[0].format(**qkv.groupdict())
                layout[name] = (3 * tensor.shape[0], *tensor.shape[1:])
            continue
        if key.startswith(_PREFIX):
            name = _published_name(key)
            if name is None:
                raise AssertionError(f"no published name for SwinModel key {key!r}")  # a map gap: a bug here
            layout[name] = tuple(tensor.shape)
        else:
            layout[key] = tuple(tensor.shape)
    for i, j, window, side, shifted in _swin_blocks(config):
        area = window * window
        layout[_PREFIX + _REL_INDEX.format(i=i, j=j)] = (area, area)
        if shifted:
            layout[_PREFIX + _ATTN_MASK.format(i=i, j=j)] = ((side // window) ** 2, area, area)
    return layout


def _check_keys(source: str, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 8 else ""
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{more}")
    if problems:
        raise CheckpointError(f"RAM++ checkpoint {source}: {'; '.join(problems)}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(
                f"RAM++ checkpoint {source}: key {key} has shape {list(found[key])}, expected {list(shape)}"
            )


def published_to_model(state: dict[str, torch.Tensor], config: RamPlusConfig, source: str) -> dict[str, torch.Tensor]:
    """Map a published-layout state dict onto `RamPlus` names (strict: see the module docstring).

    Raises:
        CheckpointError: a missing, unexpected or misshapen key, named.
    """
    state = {k: v for k, v in state.items() if k not in UNUSED_PUBLISHED_KEYS}
    _check_keys(source, {k: tuple(v.shape) for k, v in state.items()}, published_layout(config))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(p.match(key) for p in _DERIVED):
            continue
        qkv = _QKV_PUBLISHED.match(key)
        if qkv:
            for x, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[_PREFIX + _QKV[1].format(x=x, **qkv.groupdict())] = part.contiguous()
            continue
        name = key
        for pattern, template in _TO_MODEL:
            match = pattern.match(key)
            if match:
                name = template.format(**match.groupdict())
                break
        out[name] = tensor
    return out


def model_to_published(model: RamPlus) -> dict[str, torch.Tensor]:
    """The model's weights in the published layout (what `torch.save({"model": ...})` would hold).

    The derived Swin buffers are rebuilt as upstream computes them, so the result loads through
    `published_to_model` like the real file.
    """
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        qkv = _QKV_MODEL.match(key)
        if qkv:
            if qkv["x"] == "q":
                parts = [state[key.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"]
                out[_PREFIX + _QKV[0].format(**qkv.groupdict())] = torch.cat(parts, dim=0)
            continue
        out[_published_name(key) if key.startswith(_PREFIX) else key] = tensor.detach().clone()
    for i, j, window, side, shifted in _swin_blocks(model.config):
        out[_PREFIX + _REL_INDEX.format(i=i, j=j)] = _relative_position_index(window)
        if shifted:
            out[_PREFIX + _ATTN_MASK.format(i=i, j=j)] = _shift_mask(side, window)
    return out


def _relative_position_index(window: int) -> torch.Tensor:
    """Index of each (query, key) pair of a window into the (2w-1)^2 bias table (Swin's definition)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def _shift_mask(side: int, window: int) -> torch.Tensor:
    """The additive mask of shifted windows: 0 within a region, -100 across regions of the rolled grid."""
    shift = window // 2
    bands = torch.zeros(side, dtype=torch.long)
    bands[side - window :] = 1
    bands[side - shift :] = 2
    region = (bands[:, None] * 3 + bands[None, :]).float()
    windows = region.view(side // window, window, side // window, window).permute(0, 2, 1, 3).reshape(-1, window**2)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


# --------------------------------------------------------------------------- loading


def _tag_files(folder: Path | None, config: RamPlusConfig) -> tuple[list[str], list[float]]:
    """The folder's tag list and thresholds when it has them, else the bundled upstream ones."""
    tags_file = folder / TAG_LIST_NAME if folder and (folder / TAG_LIST_NAME).is_file() else BUILTIN_TAG_LIST
    thr_file = folder / THRESHOLDS_NAME if folder and (folder / THRESHOLDS_NAME).is_file() else BUILTIN_THRESHOLDS
    try:
        tags = read_tag_list(tags_file, expected=config.num_tags)
        thresholds = read_thresholds(thr_file, config.num_tags, config.threshold)
    except (OSError, TagListError) as exc:
        raise CheckpointError(f"RAM++ tag files: {exc}") from exc
    return tags, thresholds


def _read_config(folder: Path | None) -> RamPlusConfig:
    """`config.json` beside the weights (converted folders, the tiny zoo), else the published sizes."""
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return RamPlusConfig.full()
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"not a RAM++ config written by lar-gen (\"format\": \"{FORMAT}\")")
        return RamPlusConfig.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"RAM++ config {os.fspath(path)!r}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    # torch's unpickler messages carry terminal bold codes; an error line should be plain text
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_published(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a published-layout `.pth` (`{"model": ...}` or a bare state dict).

    Args:
        path: the `.pth` file.
        trust_pickle: unpickle without `weights_only` (arbitrary objects, so arbitrary code): only
            for a file the user trusts, through `convert --trust-pickle`; the engine never does.

    Raises:
        CheckpointError: unreadable, or not a state dict.
    """
    try:
        checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # a damaged or foreign file fails anywhere in the unpickler, with any type
        hint = "" if trust_pickle else " (a file you trust that holds more than tensors: convert --trust-pickle)"
        raise CheckpointError(
            f"RAM++ checkpoint {os.fspath(path)!r} cannot be read: {_first_line(exc)}{hint}"
        ) from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"RAM++ checkpoint {os.fspath(path)!r} holds no state dict (expected {{'model': ...}})")
    return checkpoint


def load_published(
    path: str | os.PathLike, config: RamPlusConfig | None = None, trust_pickle: bool = False
) -> RamPlus:
    """A `RamPlus` (eval mode, CPU) from a published-layout `.pth`.

    Args:
        path: the `.pth` file.
        config: its sizes; default: `config.json` beside it, else the published full size.
        trust_pickle: see `read_published`.

    Raises:
        CheckpointError: unreadable file, or any key missing, unexpected or misshapen (named).
    """
    path = Path(path)
    config = config or _read_config(path.parent)
    state = published_to_model(read_published(path, trust_pickle), config, repr(os.fspath(path)))
    model = RamPlus(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_converted(folder: str | os.PathLike) -> RamPlus:
    """A `RamPlus` (eval mode, CPU) from a converted folder: safetensors only, nothing unpickled.

    Raises:
        CheckpointError: a missing file, a bad config, or a key that does not match the model (named).
    """
    folder = Path(folder)
    config = _read_config(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"RAM++ folder {os.fspath(folder)!r} has no {CONFIG_NAME}")
    try:
        state = load_file(folder / WEIGHTS_NAME)
    except Exception as exc:  # safetensors raises its own SafetensorError besides OSError
        path = os.fspath(folder / WEIGHTS_NAME)
        raise CheckpointError(f"RAM++ weights {path!r} cannot be read: {_first_line(exc)}") from exc
    model = RamPlus(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(repr(os.fspath(folder / WEIGHTS_NAME)), {k: tuple(v.shape) for k, v in state.items()}, expected)
    model.load_state_dict(state, strict=True)
    return model.eval()


def resolve(ref: str | os.PathLike) -> Path:
    """The local checkpoint file of a tagger ref: a file, a folder holding one, or the hub repo id.

    A hub id downloads (or reads from the Hugging Face cache) `ram_plus_swin_large_14m.pth`.

    Raises:
        CheckpointError: no checkpoint at a local path, or the download fails.
    """
    from dataengine.config import is_local_ref

    ref_str = os.fspath(ref)
    if not is_local_ref(ref_str):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=ref_str, filename=PUBLISHED_FILENAME))
        except Exception as exc:  # the hub client raises many types (offline, 404, auth): report each the same
            raise CheckpointError(
                f"RAM++ checkpoint {PUBLISHED_FILENAME} of hub repo {ref_str!r} cannot be downloaded: {exc}"
            ) from exc
    found = checkpoint_in(ref_str)
    if found is None:
        raise CheckpointError(
            f"RAM++ checkpoint {ref_str!r}: no such file, or a folder without {WEIGHTS_NAME} + {CONFIG_NAME}, "
            f"{PUBLISHED_FILENAME} or a single .pth file (the published one is {PUBLISHED_FILENAME} in hub "
            f"repo {HUB_REPO})"
        )
    return found


def load_ram_plus(ref: str | os.PathLike, trust_pickle: bool = False) -> LoadedRamPlus:
    """RAM++ with its tags and thresholds from any tagger ref (see `resolve`), in eval mode on the CPU.

    A converted folder loads from safetensors; a `.pth` through the strict published-layout map
    (`trust_pickle`: see `read_published`). The tag list and thresholds come from the checkpoint's
    folder when it has them (converted folders, the tiny zoo), else from the bundled upstream files.

    Raises:
        CheckpointError: see `resolve`, `load_published`, `load_converted`.
    """
    path = resolve(ref)
    if path.name == WEIGHTS_NAME and path.suffix == ".safetensors":
        model = load_converted(path.parent)
    else:
        model = load_published(path, trust_pickle=trust_pickle)
    folder = path.parent if path.parent.joinpath(CONFIG_NAME).is_file() else None
    tags, thresholds = _tag_files(folder, model.config)
    return LoadedRamPlus(model=model, tags=tags, thresholds=thresholds, source=os.fspath(path))


def check_checkpoint(ref: str | os.PathLike) -> Path:
    """Check a tagger ref's checkpoint without loading its weights: keys, shapes, config, tag files.

    Cheap enough for the driver before any worker starts: safetensors headers, or the `.pth`
    memory-mapped (tensors are not read). A hub id is downloaded (once; workers then read the cache).

    Returns:
        The checkpoint file.

    Raises:
        CheckpointError: as `load_ram_plus` would, with the same messages.
    """
    path = resolve(ref)
    if path.name == WEIGHTS_NAME and path.suffix == ".safetensors":
        if not (path.parent / CONFIG_NAME).is_file():
            raise CheckpointError(f"RAM++ folder {os.fspath(path.parent)!r} has no {CONFIG_NAME}")
        config = _read_config(path.parent)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in RamPlus(config).state_dict().items()}
        try:
            with safe_open(path, framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in list(f.keys())}
        except Exception as exc:  # safetensors raises its own SafetensorError besides OSError
            raise CheckpointError(f"RAM++ weights {os.fspath(path)!r} cannot be read: {_first_line(exc)}") from exc
        _check_keys(repr(os.fspath(path)), found, expected)
    else:
        config = _read_config(path.parent)
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
            state = state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state
            found = {k: tuple(v.shape) for k, v in state.items()}
        except Exception:  # noqa: BLE001 - not mappable (legacy format, damage): the full read says why
            found = {k: tuple(v.shape) for k, v in read_published(path).items()}
        found = {k: v for k, v in found.items() if k not in UNUSED_PUBLISHED_KEYS}
        _check_keys(repr(os.fspath(path)), found, published_layout(config))
    _tag_files(path.parent if (path.parent / CONFIG_NAME).is_file() else None, config)
    return path


# --------------------------------------------------------------------------- converting


def write_tag_files(folder: Path, tags: list[str], thresholds: list[float]) -> None:
    """Write the tag list and thresholds files of a RAM++ folder (line i = output i)."""
    (folder / TAG_LIST_NAME).write_text("\n".join(tags) + "\n", encoding="utf-8")
    (folder / THRESHOLDS_NAME).write_text("\n".join(f"{t:g}" for t in thresholds) + "\n", encoding="utf-8")


def write_config(folder: Path, config: RamPlusConfig) -> None:
    """Write `config.json` (the sizes and the format tag) into a RAM++ folder."""
    data = {"format": FORMAT, **config.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_converted(loaded: LoadedRamPlus, out: str | os.PathLike) -> Path:
    """Write `loaded` as a converted folder at `out` (which must not exist, or be an empty folder).

    Everything is written into a temporary sibling first and renamed into place, so `out` never
    holds half a conversion.

    Raises:
        FileExistsError: `out` exists and is not an empty folder.
        OSError: the folder cannot be written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {os.fspath(out)!r} exists and is not an empty folder")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        write_config(tmp, loaded.model.config)
        write_tag_files(tmp, loaded.tags, loaded.thresholds)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
