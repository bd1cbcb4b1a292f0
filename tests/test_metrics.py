"""The shipped `evaluate` modules load offline and agree with scikit-learn."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as sk

from llmkit.metrics import NAMES, classification_metrics, load


@pytest.mark.parametrize("num_labels", [2, 3, 5])
def test_match_scikit_learn(num_labels):
    rng = np.random.default_rng(num_labels)
    refs = rng.integers(0, num_labels, 211)
    preds = np.where(rng.random(211) < 0.6, refs, rng.integers(0, num_labels, 211))
    got = classification_metrics(preds.tolist(), refs.tolist(), num_labels)
    avg = "binary" if num_labels == 2 else "macro"
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(refs, preds), abs=1e-12)
    assert got["f1"] == pytest.approx(sk.f1_score(refs, preds, average=avg), abs=1e-12)
    assert got["precision"] == pytest.approx(sk.precision_score(refs, preds, average=avg), abs=1e-12)
    assert got["recall"] == pytest.approx(sk.recall_score(refs, preds, average=avg), abs=1e-12)
    assert got["f1_macro"] == pytest.approx(sk.f1_score(refs, preds, average="macro"), abs=1e-12)


def test_averages_and_degenerate_cases():
    f1 = load("f1")
    refs, preds = [0, 1, 2, 2, 1], [0, 2, 2, 2, 0]
    for avg in ("micro", "weighted", "macro"):
        want = sk.f1_score(refs, preds, average=avg, zero_division=0)
        assert f1.compute(predictions=preds, references=refs, average=avg)["f1"] == pytest.approx(want)
    # no positive predictions: precision 0 (not nan), like zero_division=0
    assert load("precision").compute(predictions=[0, 0], references=[1, 0])["precision"] == 0.0


@pytest.mark.slow
def test_modules_load_offline_in_a_fresh_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    code = ("from llmkit.metrics import load, NAMES\n"
            "print({n: load(n).compute(predictions=[1, 0, 1], references=[1, 1, 1]) for n in NAMES})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'accuracy': 0.666" in out.stdout and "'precision': 1.0" in out.stdout
    assert set(NAMES) == {"accuracy", "f1", "precision", "recall"}


def test_macro_scores_average_over_the_labels_the_rows_touch():
    """A 3-label model scored on rows that hold and predict only 2 of its labels: macro F1 / precision / recall
    average over those 2 (scikit-learn's default set), not over a third label that would add a 0 and cap macro-F1
    at 2/3; the same in compare's pairwise differences and the report's interval."""
    import numpy as np
    from sklearn.metrics import f1_score, precision_score

    from llmkit.metrics import classification_metrics
    from llmkit.report.numbers import _f1
    from llmkit.report.paired import pair

    gold = [0, 0, 2, 2, 2, 0, 2, 0]
    pred = [0, 2, 2, 2, 0, 0, 2, 0]
    got = classification_metrics(pred, gold, 3)
    assert got["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro")) == pytest.approx(0.75)
    assert got["precision"] == pytest.approx(precision_score(gold, pred, average="macro"))
    assert _f1(np.array(gold), np.array(pred), 3) == pytest.approx(0.75)
    perfect = np.array(gold)
    assert pair(np.array(gold), perfect, np.array(pred), 3, resamples=100)["f1_macro_difference"] == \
        pytest.approx(1.0 - 0.75)
