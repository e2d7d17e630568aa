"""Typed configs from YAML: nested frozen dataclasses, `key=value` overrides, strict validation.

Every problem raises `ConfigError` with a message that names the key (and, for an unknown key,
the valid ones); the command line turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Dict, Iterable, Literal, Mapping, Optional, Tuple, Type, TypeVar, Union

import yaml

from arca_jax.errors import ConfigError  # noqa: F401  (configlib.ConfigError)

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def from_dict(cls: Type[T], data: Mapping[str, Any], prefix: str = "",
              base: Optional[T] = None) -> T:
    """Builds dataclass `cls` from a (nested) mapping. A missing key keeps its default: the value
    in `base` when given, else the field's default. A nested section starts from the enclosing
    field's default instance (`RunConfig.lora = LoraConfig(rank=8, alpha=16.0)`: `lora: {rank: 4}`
    keeps alpha 16, not `LoraConfig`'s own 32)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; valid keys"
                          f"{' of ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}")
    kwargs = {} if base is None else {k: getattr(base, k) for k in fields}
    for k, v in data.items():
        default = getattr(base, k) if base is not None else fields[k].default
        if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
            kwargs[k] = from_dict(type(default), v, prefix=f"{prefix}{k}.", base=default)
        else:
            kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(obj)


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Applies `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def yaml_error_text(path: str, e: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line: the file, line and column (1-based), what was
    expected, and where the construct it was parsing started."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem is None:
        problem = " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None
    context = getattr(e, "context", None)
    cmark = getattr(e, "context_mark", None)
    if context and cmark is not None and (mark is None or (cmark.line, cmark.column) != (
            mark.line, mark.column)):
        context = f"{context} at line {cmark.line + 1}, column {cmark.column + 1}"
    text = f"{path}" + (f", {where}" if where else "") + f": not valid YAML: {problem}"
    return text + (f" ({' '.join(context.split())})" if context else "")


def read_yaml(path: str) -> Any:
    """The parsed YAML file at `path`; unreadable YAML raises `ConfigError` in one line
    (`yaml_error_text`)."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {yaml_error_text(path, e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not valid YAML: not UTF-8 text "
                          f"(byte {e.start})") from None


def load(cls: Type[T], path: Optional[str] = None, overrides: Iterable[str] = ()) -> T:
    """Reads YAML `path` (or the defaults when None), applies overrides, validates into `cls`."""
    data: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def dump(obj: Any, path: str) -> None:
    """Writes `obj` as YAML to `path` atomically (a temporary file renamed over it), so a process
    killed while writing never leaves a truncated file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
    os.replace(tmp, path)
