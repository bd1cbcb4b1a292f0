"""The files llmkit ships beside its code: the recipes, their YAML configs, the Accelerate configs and the
DeepSpeed configs. In a checkout they are the repo's recipes/, accelerate_configs/ and ds_configs/; an installed
wheel carries the same files in this package (pyproject maps them in), so a run can name them from any folder.

Two rules find a file. A name given on a command line is a path when one exists there, else a shipped name
(`cpu_zero2`, `zero2.json`, `accelerate_configs/cpu_zero2.yaml`). A relative path written inside a file (an
Accelerate config's deepspeed_config_file, a recipe config's deepspeed.config_file) is read against that file:
beside it, then the folder above it (the shipped configs name `ds_configs/...` from the folder that holds
accelerate_configs/ too), then the current folder (where `accelerate launch` itself reads it), then the shipped
files."""

from __future__ import annotations

import ast
import difflib
import json
import os
from pathlib import Path

from llmkit.errors import LlmkitError

_HERE = Path(__file__).resolve().parent

# kind -> (folder under the shipped root, suffix, what it is called in messages)
KINDS = {
    "recipe": ("recipes", ".py", "recipe"),
    "config": ("recipes/configs", ".yaml", "recipe config"),
    "accelerate": ("accelerate_configs", ".yaml", "Accelerate config"),
    "deepspeed": ("ds_configs", ".json", "DeepSpeed config"),
}


def root() -> Path:
    """The folder holding recipes/, accelerate_configs/ and ds_configs/: this package in a wheel, else the
    checkout the package is imported from (an editable install, or the repo itself)."""
    if (_HERE / "ds_configs").is_dir():
        return _HERE
    return _HERE.parents[1]


def names(kind: str) -> list[str]:
    """The shipped names of one kind (file names less the suffix), sorted."""
    folder, suffix, _ = KINDS[kind]
    return sorted(p.name.removesuffix(suffix) for p in (root() / folder).glob(f"*{suffix}") if p.is_file())


def named(text: str, kind: str) -> Path | None:
    """The shipped file of that name (`cpu_zero2` or `cpu_zero2.yaml`), or None."""
    folder, suffix, _ = KINDS[kind]
    if not text or "/" in text or os.sep in text:
        return None
    path = root() / folder / (text if text.endswith(suffix) else text + suffix)
    return path if path.is_file() else None


def find(text: str | Path, kind: str, what: str | None = None, origin: Path | None = None,
         named_by: str | None = None, fix: str | None = None) -> Path:
    """The file `text` names: an absolute path; else, relative, read against `origin` (the file that wrote it:
    its folder, then the folder above), the current folder and the shipped root; else a shipped name. Not found:
    one error naming where the text came from, every place looked and the fix."""
    raw = str(text)
    what = what or KINDS[kind][2]
    path = Path(raw).expanduser()
    places = [path] if path.is_absolute() else [
        *([origin.parent / path, origin.parent.parent / path] if origin is not None else []),
        Path.cwd() / path, root() / path]
    places = list(dict.fromkeys(Path(os.path.abspath(p)) for p in places))
    found = next((p for p in places if p.is_file()), None) or named(raw, kind)
    if found is not None:
        return found
    folder = next((p for p in places if p.is_dir()), None)
    if folder is not None:
        raise LlmkitError(f"{what} '{raw}' is a folder ({folder}), not a file")
    by = f" (named by {named_by})" if named_by else ""
    relative_to = f"the folder of '{origin}'" if origin is not None else "the current folder"
    shipped = names(kind)
    close = difflib.get_close_matches(Path(raw).name.removesuffix(KINDS[kind][1]), shipped, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise LlmkitError(f"{what} '{raw}'{by} does not exist: looked in {', '.join(map(str, places))}, and llmkit ships "
                      f"no {KINDS[kind][2]} of that name{hint}. "
                      + (fix or f"Give the file's path (absolute, or relative to {relative_to}), or a shipped name: "
                                f"{', '.join(shipped) or 'none'} (`llmkit recipes` lists them)"))


def summary(path: Path, width: int = 100) -> str:
    """The first sentence a shipped file says about itself (a recipe's docstring, a YAML's leading comment, a
    DeepSpeed JSON's _comment), cut to `width` characters."""
    text = path.read_text()
    if path.suffix == ".py":
        said = ast.get_docstring(ast.parse(text)) or ""
    elif path.suffix == ".json":
        note = json.loads(text).get("_comment", "")
        said = " ".join(note) if isinstance(note, list) else str(note)
    else:
        head = []
        for line in text.splitlines():  # the comment block at the top
            if not line.startswith("#"):
                break
            head.append(line.lstrip("# "))
        said = " ".join(head)
    said = " ".join(said.split())
    said = said[: said.find(". ") + 1] if ". " in said else said
    return said if len(said) <= width else said[: width - 3].rstrip() + "..."


def accelerate_deepspeed_file(settings, path: Path) -> Path | None:
    """The DeepSpeed JSON an Accelerate config (its settings, read from `path`) names as deepspeed_config_file,
    read against that config; None when it names none."""
    section = settings.get("deepspeed_config") if isinstance(settings, dict) else None
    raw = section.get("deepspeed_config_file") if isinstance(section, dict) else None
    if not raw or raw == "none":
        return None
    return find(str(raw), "deepspeed", origin=Path(path),
                named_by=f"deepspeed_config_file in Accelerate config '{path}'")
