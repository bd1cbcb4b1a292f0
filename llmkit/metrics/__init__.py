"""Classification metrics as `evaluate` modules that ship inside llmkit (loaded by path, work offline), and the
one list of metric names the rest of llmkit uses."""

from __future__ import annotations

import math
from pathlib import Path

NAMES = ("accuracy", "f1", "precision", "recall")  # the shipped modules
CLASSIFICATION = (*NAMES, "f1_macro")  # what classification_metrics returns
LM = ("loss", "perplexity")  # causal-LM evaluation (label-word runs report both kinds)
LOWER_IS_BETTER = LM
ALL = (*CLASSIFICATION, *LM)


def perplexity(loss: float) -> float:
    """exp of a mean next-token negative log-likelihood (capped at exp(50): a diverged model, not an overflow).
    The one place perplexity is computed: the run's evaluation, quantized copies, the asset check."""
    return math.exp(min(loss, 50.0))


def load(name: str):
    """Load one of the shipped metric modules by its name."""
    import evaluate  # deferred: the config imports the names above and must stay light

    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; shipped: {', '.join(NAMES)}")
    return evaluate.load(str(Path(__file__).parent / name))


def classification_metrics(predictions, references, num_labels: int) -> dict[str, float]:
    """accuracy, f1, precision, recall (binary for 2 classes, of class 1; macro otherwise) and macro F1."""
    average = "binary" if is_binary(range(num_labels)) else "macro"
    # macro over the labels the rows hold or the model predicts (scikit-learn's default): a label of the model's
    # that the scored rows never touch (a 3-class model on 2-label data) would add an F1 of 0, not evidence
    labels = sorted(set(map(int, references)) | set(map(int, predictions)))
    out = load("accuracy").compute(predictions=predictions, references=references)
    for name in ("f1", "precision", "recall"):
        kwargs = {"average": average} if average == "binary" else {"average": average, "labels": labels}
        out.update(load(name).compute(predictions=predictions, references=references, **kwargs))
    out["f1_macro"] = load("f1").compute(predictions=predictions, references=references,
                                         average="macro", labels=labels)["f1"]
    return {k: float(v) for k, v in out.items()}


# binary vs macro is decided here, for every page, card and printed line (f1, precision, recall of two labels:
# class 1's, the label that sorts second unless data.label_names orders them; of more: the macro average)
def is_binary(label_names) -> bool:
    return label_names is not None and len(label_names) == 2


def metric_label(name: str, label_names) -> str:
    """The name a metric is shown under, saying what it is of: "F1 (positive: legit)" for two labels,
    "F1 (macro)" for more; ROC AUC and average precision of more labels are one-vs-rest macro averages."""
    if name == "f1_macro":
        return "F1 (macro)"
    if label_names is None:  # the labels unknown: the key itself, rather than a guess
        return name
    of = f"positive: {label_names[1]}" if is_binary(label_names) else "macro"
    shown = {"f1": f"F1 ({of})", "precision": f"precision ({of})", "recall": f"recall ({of})",
             "roc_auc": "ROC AUC" if is_binary(label_names) else "ROC AUC (one-vs-rest, macro)",
             "average_precision": f"average precision ({of})" if is_binary(label_names)
             else "average precision (one-vs-rest, macro)"}
    return shown.get(name, name)


def shown(label_names) -> tuple[str, ...]:
    """The classification metrics to show, each once: of more than two labels `f1` is the macro F1 already."""
    if is_binary(label_names):
        return ("accuracy", "f1", "f1_macro", "precision", "recall")
    return NAMES


def averaging(label_names) -> dict:
    """What f1 / precision / recall average over, for the JSON beside them (metrics.json, report.json)."""
    if is_binary(label_names):
        return {"f1_average": "binary", "f1_positive_label": label_names[1]}
    return {"f1_average": "macro"}


def scores_line(m: dict, label_names) -> str:
    """One split's scores for a printed line, each named by what it is of ("F1 (positive: legit)", "F1 (macro)")."""
    said = [f"{metric_label(k, label_names)} {m[k]:.4f}" for k in shown(label_names)
            if k in m and k in ("accuracy", "f1", "f1_macro")]
    if "perplexity" in m:
        said.append(f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}")
    if "samples" in m:
        said.append(f"({m['samples']} rows)")
    return "  ".join(said)
