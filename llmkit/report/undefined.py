"""A statistic with no value on the rows it is given (0 or 1 rows, one class, no discordant row, no minimum): in
the JSON its place holds {"defined": false, "why": <reason>, <counts>} instead of a number, and every page prints
"not defined: <reason> (<counts>)" where the number would stand. One convention for the run's report and for
`llmkit compare`, so that no number is shown where the rows cannot give one."""

from __future__ import annotations

import math


def not_defined(why: str, **counts) -> dict:
    """The value of a statistic the rows cannot give; `counts` say what the rows held (rows=1, support={...})."""
    return {"defined": False, "why": why, **counts}


def defined(value) -> bool:
    return not (isinstance(value, dict) and value.get("defined") is False)


def says(value: dict) -> str:
    """'not defined: too few rows (rows 1)': the reason and its counts, as a page prints them."""
    def count(v) -> str:
        return ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else f"{v:.4g}" \
            if isinstance(v, float) else str(v)

    counts = "; ".join(f"{k.replace('_', ' ')} {count(v)}" for k, v in value.items() if k not in ("defined", "why"))
    return f"not defined: {value['why']}" + (f" ({counts})" if counts else "")


def shown(value, spec: str = ".4f") -> str:
    """A number in `spec`, the reason where it is not defined, '-' where there is none."""
    if value is None:
        return "-"
    return format(value, spec) if defined(value) else says(value)


def interval(ci, spec: str = ".4f", scale: float = 1.0, between: str = "-") -> str:
    """A [low, high] interval, or why there is none."""
    if not defined(ci):
        return says(ci)
    return f"{scale * ci[0]:{spec}}{between}{scale * ci[1]:{spec}}"


def excludes_zero(ci) -> bool:
    return defined(ci) and (ci[0] > 0 or ci[1] < 0)


def finite(doc):
    """The document with every NaN or infinity (a statistic that slipped past its guard) replaced by its reason:
    json.dumps would write NaN, which is no JSON, and a page would print it as a number."""
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return not_defined(f"not a finite number ({doc})")
    return doc
