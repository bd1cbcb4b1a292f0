"""A config from a YAML file and `--section.key value` overrides: each value checked against the schema's type
(llmkit.config.typed), then its value rules (llmkit.config.checks). The result is frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmkit import shipped
from llmkit.config.checks import check_values
from llmkit.config.schema import RENAMED, Config
from llmkit.config.typed import build, did_you_mean, hints, read_yaml
from llmkit.errors import LlmkitError


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise LlmkitError(f"unexpected argument '{arg}': overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LlmkitError(f"override '{arg}' has no value: write {arg} VALUE")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def _full_key(key: str) -> tuple[str, str]:
    """'train.learning_rate' -> (train, learning_rate); a bare leaf name works when it is unique."""
    sections = hints(Config)
    if "." in key:
        section, leaf = key.split(".", 1)
        return section, leaf
    owners = [s for s, cls in sections.items() if key in hints(cls)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise LlmkitError(f"override '--{key}' is ambiguous: write one of " + ", ".join(f"--{s}.{key}" for s in owners))
    leaves = [f"{s}.{k}" for s, cls in sections.items() for k in hints(cls)]
    raise LlmkitError(f"unknown config key '{key}'{did_you_mean(key, leaves)}")


def _refuse_renamed(raw: dict) -> None:
    """A key an earlier llmkit called otherwise, in a section or in a data.mixture source: the one line that names
    the new key (the typed build would only say the old one is unknown)."""
    places = [(s, v) for s, v in raw.items() if isinstance(v, dict)]
    mixture = (raw.get("data") or {}).get("mixture") if isinstance(raw.get("data"), dict) else None
    places += [(f"data.mixture[{i}]", m) for i, m in enumerate(mixture or []) if isinstance(m, dict)]
    for where, values in places:
        for old, new in RENAMED.items():
            if old in values:
                raise LlmkitError(f"config key '{where}.{old}' is now '{where}.{new}'; rename it in the config "
                                  "(or the override)")


def _find_deepspeed_file(raw: dict, written_in: Path | None) -> None:
    """deepspeed.config_file made a path that exists: one the config file wrote is read against that file, one from
    the command line against the current folder; either may be a shipped name (llmkit.shipped)."""
    section = raw.get("deepspeed")
    value = section.get("config_file") if isinstance(section, dict) else None
    if isinstance(value, str) and value not in ("", "none"):
        named_by = f"deepspeed.config_file in config file '{written_in}'" if written_in else "deepspeed.config_file"
        section["config_file"] = str(shipped.find(value, "deepspeed", origin=written_in, named_by=named_by))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--section.key value` overrides, validate, return the typed config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = shipped.find(path, "config", "config file")  # a path, or the name of a shipped recipe config
        raw = read_yaml(path, "config file")
        if not isinstance(raw, dict):
            raise LlmkitError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    written_in = path
    for key, text in _split_overrides(overrides or []):
        section, leaf = _full_key(key)
        if (section, leaf) == ("deepspeed", "config_file"):
            written_in = None  # given on the command line: read against the current folder
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise LlmkitError(f"config section '{section}' must be a mapping")
        current[leaf] = value
    _refuse_renamed(raw)
    _find_deepspeed_file(raw, written_in)
    config = build(raw, Config)
    check_values(config)
    return config
