"""Shared arithmetic of the shipped metric modules (numpy only, so they work offline)."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


def _per_class(predictions, references, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, ref = np.asarray(predictions), np.asarray(references)
    tp = np.array([np.sum((pred == c) & (ref == c)) for c in labels], dtype=np.float64)
    fp = np.array([np.sum((pred == c) & (ref != c)) for c in labels], dtype=np.float64)
    fn = np.array([np.sum((pred != c) & (ref == c)) for c in labels], dtype=np.float64)
    return tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # 0/0 counts as 0, as scikit-learn's zero_division=0 does
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def score(kind: str, predictions, references, average: str = "binary", pos_label=1, labels=None) -> float:
    """Precision, recall or F1 with average binary | macro | micro | weighted."""
    if labels is None:
        labels = sorted(set(np.asarray(references).tolist()) | set(np.asarray(predictions).tolist()))
    if average == "binary":
        labels = [pos_label]
    elif average == "micro":
        tp, fp, fn = (x.sum(keepdims=True) for x in _per_class(predictions, references, labels))
        return float(_value(kind, tp, fp, fn)[0])
    tp, fp, fn = _per_class(predictions, references, labels)
    values = _value(kind, tp, fp, fn)
    if average == "weighted":
        support = tp + fn
        return float(np.sum(values * support) / support.sum()) if support.sum() else 0.0
    if average not in ("binary", "macro"):
        raise ValueError(f"average must be binary, macro, micro or weighted, got {average!r}")
    return float(values.mean())


def per_class_scores(predictions, references, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each class in `labels` (0 where undefined)."""
    tp, fp, fn = _per_class(predictions, references, labels)
    return tuple(_value(kind, tp, fp, fn) for kind in ("precision", "recall", "f1"))


def _value(kind: str, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if kind == "precision":
        return precision
    if kind == "recall":
        return recall
    return _ratio(2 * tp, 2 * tp + fp + fn)


_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    average (str): 'binary' (default, scores pos_label only), 'macro', 'micro' or 'weighted'.
    pos_label (int): the positive class for average='binary'. Default 1.
    labels (list of int): classes to include for the multiclass averages. Default: all seen.
Returns:
    {kind} (float): in [0, 1].
"""


class CountMetric(evaluate.Metric):
    """Base of the precision / recall / F1 modules; a subclass sets KIND and DESCRIPTION."""

    KIND = ""
    DESCRIPTION = ""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation="",
            inputs_description=_KWARGS.format(kind=self.KIND),
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        value = score(self.KIND, predictions, references, average=average, pos_label=pos_label, labels=labels)
        return {self.KIND: value}
