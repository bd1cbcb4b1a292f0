"""A nested dataclass from plain YAML data: each section and key checked against its annotation, unknown names
answered with the closest known one. Knows nothing of llmkit's own schema (llmkit.config)."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any

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
        cls = sections[section]
        values = values or {}
        if not isinstance(values, dict):
            raise LlmkitError(f"config section '{section}' must be a mapping of keys, got {values!r}")
        fields = hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise LlmkitError(f"unknown config key '{section}.{key}'{did_you_mean(key, list(fields))}")
            kwargs[key] = _coerce(f"{section}.{key}", value, fields[key])
        built[section] = cls(**kwargs)
    return root(**built)
