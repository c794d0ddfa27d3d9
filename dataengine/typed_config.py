"""Typed YAML configuration: strict pydantic models, `--set a.b=c` overrides, readable errors.

Shared by pipelines.yaml (dataengine.config) and the trainer's stage configs, so every config in
the project fails the same way: an unknown key, a wrong type or a bad value names the dotted key,
what was given and what is allowed.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and what is allowed."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a UTF-8 text (YAML) file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where (line, column)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], parsed value); values are parsed as YAML scalars.

    Raises:
        ConfigError: the item has no `=` or an empty key.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. ground.box_threshold=0.3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], keys: list[str], value: Any, prefix: str = "") -> None:
    """Set `data[k0][k1]...` = value, creating mappings on the way.

    A key part that meets a list is an index into it (`inputs.0.images_per_shard`); it must be a
    whole number from 0 to len - 1, so `--set` only edits existing items (replace the whole list
    with `--set inputs=[...]` to add or remove some).

    Raises:
        ConfigError: descending into a scalar, or a list index that is not a number or is out of range.
    """
    node: Any = data
    walked = prefix
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        parent = walked
        walked = f"{walked}.{key}" if walked else key
        if isinstance(node, list):
            index = _list_index(node, key, parent, walked)
            if last:
                node[index] = value
                return
            child = node[index]
        else:
            if last:
                node[key] = value
                return
            child = node.get(key)
            if child is None:
                child = node[key] = {}
        if not isinstance(child, dict | list):
            raise ConfigError(f"--set {walked}: {walked!r} is a value ({child!r}), not a section")
        node = child


def _list_index(items: list[Any], key: str, list_key: str, walked: str) -> int:
    """`key` as an index of `items` (the list at `list_key`), or a ConfigError naming both."""
    size = f"{list_key!r} is a list of {len(items)} item{'' if len(items) == 1 else 's'}"
    allowed = f"indexes 0 to {len(items) - 1}" if items else "no index is valid"
    try:
        index = int(key)
    except ValueError:
        raise ConfigError(f"--set {walked}: {size}: {key!r} is not an index ({allowed})") from None
    if index < 0 or index >= len(items) or not key.isdigit():
        raise ConfigError(f"--set {walked}: index {key} is out of range: {size} ({allowed})")
    return index


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], base: list[str] | None = None) -> dict[str, Any]:
    """Return a deep copy of `data` with `--set` overrides applied.

    A key whose first part is a top-level key of `data` is absolute; otherwise it is taken
    relative to `base` (e.g. the selected pipeline), so `--set ground.box_threshold=0.3` works.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        keys, value = parse_override(item)
        if base and keys[0] not in out:
            keys = [*base, *keys]
        set_path(out, keys, value)
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names allowed at `loc` (the parent of an unknown key), if they can be found."""
    current: Any = model
    for part in loc:
        model_cls = _model_in(current)
        if model_cls is not None and isinstance(part, str) and part in model_cls.model_fields:
            current = model_cls.model_fields[part].annotation
        else:  # a dict key or list index: step into the container's value type
            current = _container_value(current)
    found = _model_in(current)
    return list(found.model_fields) if found is not None else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation is (or holds via Optional/Union), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _container_value(annotation: Any) -> Any:
    """The value type of dict[K, V] / list[V] (through Optional), else None."""
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict):  # noqa: UP006
        return typing.get_args(annotation)[1]
    if origin in (list, tuple, typing.List):  # noqa: UP006
        return typing.get_args(annotation)[0]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _container_value(arg)
            if found is not None:
                return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str, prefix: str = "") -> str:
    """One line per problem: `source: dotted.key: what is wrong (got X)`."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic puts the union/tagged-member name into loc; keep only real keys and indices.
        shown = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "function-after"}))]
        key = ".".join(filter(None, [prefix, *shown]))
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: {key}: unknown key{hint}")
            continue
        msg = err["msg"]
        if err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
            continue
        given = err.get("input")
        got = "" if isinstance(given, dict | list) else f" (got {given!r})"
        lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def validate(model: type[M], data: Mapping[str, Any], source: str = "config", prefix: str = "") -> M:
    """Validate `data` into `model`.

    Raises:
        ConfigError: with one readable line per problem.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source, prefix)) from None


def load_typed(model: type[M], path: str | Path, overrides: Iterable[str] = ()) -> M:
    """Read a YAML file, apply `--set` overrides, and validate it into `model`."""
    data = apply_overrides(read_yaml(path), overrides)
    return validate(model, data, source=str(path))
