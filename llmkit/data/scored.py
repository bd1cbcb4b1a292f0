"""A labelled split read to score a trained model on (`llmkit eval`, `compare`, `quantize`): the data's labels are
matched to the model's by name. Class ids count as the model's ids only when they are exactly its ids; any
other id set, or a name the model does not know, is refused in one line or mapped by an explicit --label-map.
A subset of the model's labels is fine, and said."""

from __future__ import annotations

from datasets import ClassLabel

from llmkit.config import DataConfig
from llmkit.data.sources import load_labeled
from llmkit.errors import LlmkitError


def parse_label_map(items: list[str] | None) -> dict[str, str] | None:
    """`--label-map 0=negative 1=positive` as {"0": "negative", "1": "positive"}."""
    if not items:
        return None
    out = {}
    for item in items:
        data, sep, model = item.partition("=")
        if not sep or not data.strip() or not model.strip():
            raise LlmkitError(f"--label-map {item!r}: give DATA_LABEL=MODEL_LABEL pairs, e.g. --label-map "
                              "0=negative 1=positive")
        if data.strip() in out:
            raise LlmkitError(f"--label-map maps the data label {data.strip()!r} twice")
        out[data.strip()] = model.strip()
    return out


def matcher(names: list[str], label_map: dict[str, str] | None, column: str):
    """The function load_labeled applies to each split's labels: every label as one of the model's `names`."""
    if label_map and (unknown := sorted(set(label_map.values()) - set(names))):
        raise LlmkitError(f"--label-map maps to {unknown[0]!r}, which is not one of the model's labels {names}")

    def match(values: list, feature, split: str) -> list:
        if label_map:
            if missing := sorted({str(v) for v in values if v is not None} - set(label_map)):
                raise LlmkitError(f"--label-map does not say which model label the data label {missing[0]!r} of split "
                                  f"'{split}' is (it maps {sorted(label_map)}); add {missing[0]}=<one of {names}>")
            return [None if v is None else label_map[str(v)] for v in values]
        if isinstance(feature, ClassLabel):  # ids the dataset itself names: match the names
            values = [None if v is None else feature.names[v] for v in values]
        ids = sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool)})
        if ids:
            if all(n == str(i) for i, n in enumerate(names)):  # the model was trained on these ids: they are its names
                return [None if v is None else str(v) for v in values]
            if ids != list(range(len(names))):
                raise LlmkitError(
                    f"column '{column}' of split '{split}' holds the class ids {ids}, but the model has "
                    f"{len(names)} labels {names}: ids are read as the model's only when they are exactly its ids "
                    f"0-{len(names) - 1}. Say which label each id is: --label-map "
                    + " ".join(f"{i}=<label>" for i in ids[:3]) + (" ..." if len(ids) > 3 else ""))
            return [None if v is None else names[v] for v in values]
        if unknown := sorted({v for v in values if isinstance(v, str)} - set(names)):
            raise LlmkitError(f"split '{split}' has the label {unknown[0]!r}, which the model does not know (its "
                              f"labels: {names}); map the data's labels with --label-map {unknown[0]}=<one of them>")
        return values
    return match


ROW_DEFAULTS = {"text_column": "text", "text_pair_column": None, "label_column": "label", "max_length": 512}


def settings(recorded: dict, **given) -> dict:
    """How rows are read: each flag given, else what the run recorded (its training_config.yaml `data`), else the
    command's default."""
    return {key: given[key] if given.get(key) is not None else recorded.get(key, default)
            for key, default in ROW_DEFAULTS.items()}


def read(cfg: DataConfig, names: list[str], label_map: dict[str, str] | None = None, keep: tuple[str, ...] = (),
         log=print):
    """The split of a one-split config (sources.one_split) with its labels as the model's ids ("labels")."""
    return load_labeled(cfg, seed=0, log=log, training=False, keep=keep,
                        match=matcher(names, label_map, cfg.label_column)).rows["validation"]


def labels_seen(ids: list[int], names: list[str]) -> dict[str, int]:
    """Rows per model label in the scored rows (a label with none is listed with 0)."""
    counts = dict.fromkeys(names, 0)
    for i in ids:
        counts[names[i]] += 1
    return counts


def said(counts: dict[str, int]) -> str | None:
    """One line when the rows hold only some of the model's labels, else None."""
    absent = [n for n, c in counts.items() if c == 0]
    if not absent:
        return None
    held = [n for n, c in counts.items() if c]
    return (f"the data holds {len(held)} of the model's {len(counts)} labels ({', '.join(held)}); no row is "
            f"labelled {', '.join(absent)}")
