"""`llmkit config`: every config key with its type, default and meaning, read from llmkit/config.py itself (the
dataclasses for names, types and defaults; each field's comment for its meaning), so the list cannot drift from
the schema; `--write FILE --recipe R` writes a starter YAML of every key R reads, at its default, commented."""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmkit import config as schema
from llmkit.errors import LlmkitError
from llmkit.preflight import ONLY_IN, RECIPES

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


def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> its comment in llmkit/config.py: the one on its line, else the comment lines right above
    it, which also speak for the uncommented fields that follow directly."""
    source = Path(schema.__file__).read_text()
    lines = source.splitlines()
    own, above = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if lines[row - 1].strip().startswith("#"):
                above[row] = text
            else:
                own[row] = text
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        inherited, last_row = "", None
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            row, block = item.lineno, []
            while row - 1 - len(block) in above:
                block.insert(0, above[row - 1 - len(block)])
            if block:
                inherited = " ".join(block)
            elif last_row != row - 1 or item.end_lineno is None:
                inherited = ""
            found[(node.name, item.target.id)] = own.get(row) or inherited
            if own.get(row):
                inherited = ""
            last_row = item.end_lineno
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def keys() -> list[Key]:
    """Every key of the config, section by section (a mixture source's after data's)."""
    notes = _comments()
    out = []
    sections = [(f.name, f.type) for f in dataclasses.fields(schema.Config)]
    for section, cls_name in [*sections, (MIXTURE, "MixtureSource")]:
        cls = getattr(schema, cls_name)
        for f in dataclasses.fields(cls):
            out.append(Key(f"{section}.{f.name}", str(f.type), _default(f), notes.get((cls_name, f.name), "")))
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
    return "\n".join(out) + "\n"


def starter(recipe: str) -> str:
    """A YAML of every key `recipe` reads, at its default (the offline assets to start from), each under its
    meaning as a comment. It loads and validates as is."""
    if recipe not in RECIPES:
        raise LlmkitError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    other = next(r for r in RECIPES if r != recipe)
    skip = set(ONLY_IN[other])
    out = [f"# llmkit starter config for recipes/{recipe}.py: every key it reads, at its default (`llmkit config` "
           "lists them all).", f"# Run: llmkit launch --config_file accelerate_configs/cpu_zero2.yaml "
           f"recipes/{recipe}.py --config <this file>"]
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
