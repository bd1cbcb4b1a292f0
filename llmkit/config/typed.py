"""A nested dataclass from plain YAML data: each section and key checked against its annotation, unknown names
answered with the closest known one; YAML files read with a key given twice refused. Knows nothing of llmkit's
own schema (llmkit.config.schema)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import LlmkitError

INT_MAX = 2**31 - 1  # integers reach torch and C libraries (threads, steps, sizes) as 32-bit ints


def hints(cls: type) -> dict[str, Any]:
    """A dataclass's field annotations, resolved."""
    return typing.get_type_hints(cls)


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (floats may come as YAML strings like 5e-5)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # the allowed values, listed by the schema
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:  # True is not the 1 of a zero stage
            return value
        raise LlmkitError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_i in inner[:-1]:  # e.g. list[float] | str: the first annotation the value fits
            try:
                return _coerce(key, value, tp_i)
            except LlmkitError:
                pass
        return _coerce(key, value, inner[-1])
    if origin is list:
        if not isinstance(value, list):
            raise LlmkitError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LlmkitError(f"config key '{key}' must be a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _mapping(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_MAX:
                raise LlmkitError(f"config key '{key}' is {value}, beyond what it can hold (at most {INT_MAX:,})")
            return value
    elif tp is float:
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # inf epochs or a NaN rate pass every comparison, then fail mid-run
                raise LlmkitError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    name = getattr(tp, "__name__", str(tp))
    raise LlmkitError(f"config key '{key}' must be of type {name}, got {value!r} ({type(value).__name__})")


def build(raw: dict[str, Any], root: type):
    """`raw` (YAML sections of keys) as the nested dataclass `root`, every value checked against its annotation."""
    sections = hints(root)
    if not isinstance(raw, dict):
        raise LlmkitError(f"the config must be a mapping of sections {sorted(sections)}, got {type(raw).__name__}")
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise LlmkitError(f"unknown config section '{section}'{did_you_mean(section, list(sections))}")
        if values is not None and not isinstance(values, dict):
            raise LlmkitError(f"config section '{section}' must be a mapping of keys, got {values!r}")
        built[section] = _mapping(section, values or {}, sections[section])
    return root(**built)


def _mapping(key: str, values: Any, cls: type):
    """A YAML mapping as the dataclass `cls` (a section, or an item such as one data.mixture source)."""
    if not isinstance(values, dict):
        raise LlmkitError(f"config key '{key}' must be a mapping of keys, got {values!r}")
    fields = hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise LlmkitError(f"unknown config key '{key}.{name}'{did_you_mean(name, list(fields))}")
        kwargs[name] = _coerce(f"{key}.{name}", value, fields[name])
    try:
        return cls(**kwargs)
    except TypeError:  # a required field left out
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise LlmkitError(f"config key '{key}' needs {', '.join(missing)}") from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is set twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a clear error naming `what` when it is missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"{what} '{path}' " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeys) or {}
    except yaml.YAMLError as exc:
        raise LlmkitError(f"{what} '{path}' is not valid YAML: {exc}") from None


def flatten(node: dict, prefix: str = "") -> dict:
    """Nested YAML / JSON mappings as one mapping of dotted keys ({"train": {"seed": 1}} -> {"train.seed": 1})."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
