"""Classification metrics as `evaluate` modules that ship inside llmkit (loaded by path, work offline), and the
one list of metric names the rest of llmkit uses."""

from __future__ import annotations

from pathlib import Path

NAMES = ("accuracy", "f1", "precision", "recall")  # the shipped modules
CLASSIFICATION = (*NAMES, "f1_macro")  # what classification_metrics returns
LM = ("loss", "perplexity")  # causal-LM evaluation (label-word runs report both kinds)
LOWER_IS_BETTER = LM
ALL = (*CLASSIFICATION, *LM)


def load(name: str):
    """Load one of the shipped metric modules by its name."""
    import evaluate  # deferred: the config imports the names above and must stay light

    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; shipped: {', '.join(NAMES)}")
    return evaluate.load(str(Path(__file__).parent / name))


def classification_metrics(predictions, references, num_labels: int) -> dict[str, float]:
    """accuracy, f1, precision, recall (binary for 2 classes, macro otherwise) and macro F1."""
    average = "binary" if num_labels == 2 else "macro"
    labels = list(range(num_labels))
    out = load("accuracy").compute(predictions=predictions, references=references)
    for name in ("f1", "precision", "recall"):
        kwargs = {"average": average} if average == "binary" else {"average": average, "labels": labels}
        out.update(load(name).compute(predictions=predictions, references=references, **kwargs))
    out["f1_macro"] = load("f1").compute(predictions=predictions, references=references,
                                         average="macro", labels=labels)["f1"]
    return {k: float(v) for k, v in out.items()}
