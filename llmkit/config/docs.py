"""`llmkit config`: every config key with its type, allowed values, default and meaning, read from the schema
(llmkit.config.schema), so the list cannot drift from it; `--write FILE --recipe R` writes a starter YAML of
every key R reads, at its default, commented."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmkit.config import schema
from llmkit.errors import LlmkitError

# what a starter needs beyond the defaults to run offline as is (the assets `llmkit assets` installs)
STARTS = {
    "classification": {"model.name_or_path": "asset:minilm", "data.dataset": "asset:polarity",
                       "data.label_names": ["negative", "positive"],
                       "output.output_dir": "outputs/starter_classification"},
    "causal_lm": {"model.name_or_path": "asset:smollm2", "data.dataset": "asset:polarity",
                  "output.output_dir": "outputs/starter_causal_lm"},
}
MIXTURE = "data.mixture[]"  # the keys of one data.mixture source


@dataclass
class Key:
    name: str  # section.key
    type: str
    default: Any  # dataclasses.MISSING: required
    meaning: str
    readers: tuple[str, ...]  # schema.READERS that read it


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type(tp: Any) -> str:
    """An annotation as a reader wants it: `one of a, b, c` for a Literal."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if tp is type(None):
        return "None"
    if args:  # list[str], dict[str, str], list[MixtureSource]
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    return tp.__name__


def keys() -> list[Key]:
    """Every key of the config, section by section (a mixture source's after data's)."""
    out = []
    for section, cls in [*schema.sections(), (MIXTURE, schema.MixtureSource)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append(Key(f"{section}.{f.name}", _type(hints[f.name]), _default(f), f.metadata["help"],
                           f.metadata["readers"]))
    return out


def _yaml(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").strip()


def listing() -> str:
    """The keys as text, grouped by section."""
    out, section = [], None
    for key in keys():
        head = key.name.rsplit(".", 1)[0]
        if head != section:
            section = head
            out.append(f"\n{section}:" if out else f"{section}:")
        out.append(f"  {key.name}: {key.type} = {_yaml(key.default)}")
        out.append(f"      {key.meaning}")
        if set(key.readers) != set(schema.READERS):
            out.append(f"      read only by {schema.who_reads(key.readers)}")
    return "\n".join(out) + "\n"


def starter(recipe: str) -> str:
    """A YAML of every key `recipe` reads, at its default (the offline assets to start from), each under its
    meaning as a comment. It loads and validates as is."""
    if recipe not in schema.RECIPES:
        raise LlmkitError(f"--recipe must be one of {', '.join(schema.RECIPES)}, got {recipe!r}")
    skip = {k.name for k in keys() if recipe not in k.readers}
    out = [f"# llmkit starter config for recipes/{recipe}.py: every key it reads, at its default (`llmkit config` "
           "lists them all).", f"# Run, from any folder: llmkit train {recipe} --config <this file> "
           "--accelerate-config cpu_zero2"]
    section = None
    mixture = [k for k in keys() if k.name.startswith(MIXTURE + ".")]
    for key in keys():
        if key.name in skip or key.name.startswith(MIXTURE):
            continue
        head, leaf = key.name.split(".", 1)
        if head != section:
            section = head
            out.append(f"\n{section}:")
        if key.meaning:
            out.append(f"  # {key.meaning}")
        if key.name == "data.mixture":
            out.append("  # each source: " + "; ".join(f"{k.name.rsplit('.', 1)[1]} ({k.meaning})" for k in mixture))
        out.append(f"  {leaf}: {_yaml(STARTS[recipe].get(key.name, key.default))}")
    return "\n".join(out) + "\n"


def write(path: str, recipe: str) -> None:
    """`llmkit config --write`: the starter YAML of `recipe`, never over an existing file."""
    target = Path(path)
    if target.exists():
        raise LlmkitError(f"{target} already exists: llmkit config --write does not overwrite; pick another path")
    target.write_text(starter(recipe))
    print(f"wrote {target}: a starter config for recipes/{recipe}.py (check it: llmkit validate {target})")
