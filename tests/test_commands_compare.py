"""`llmkit compare` (llmkit.commands.compare): the pairwise statistics against scipy and a hand count, and the
command on a real run's export against a copy whose head is flipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

from llmkit.commands.compare import ece, pair


def test_the_pairwise_statistics():
    gold = np.array([0, 1] * 50)
    a = gold.copy()
    b = gold.copy()
    b[:20] = 1 - b[:20]  # B gets 20 rows wrong that A gets right
    a[90:93] = 1 - a[90:93]  # and A gets 3 wrong that B gets right
    got = pair(gold, a, b, 2, resamples=500, seed=1)
    assert (got["only_a_right"], got["only_b_right"]) == (20, 3)
    assert got["mcnemar_exact_p"] == pytest.approx(binomtest(3, 23, 0.5).pvalue) and got["mcnemar_exact_p"] < 0.01
    assert got["accuracy_difference"] == pytest.approx(0.97 - 0.80)
    lo, hi = got["accuracy_difference_ci95"]
    assert 0 < lo < got["accuracy_difference"] < hi  # the gain is real on these rows
    assert got["agreement"] == pytest.approx(77 / 100)
    assert pair(gold, a, b, 2, resamples=500, seed=1) == got  # the seed fixes the resamples
    same = pair(gold, a, a, 2, resamples=200)
    assert same["accuracy_difference_ci95"] == [0.0, 0.0] and same["mcnemar_exact_p"] == 1.0
    assert same["agreement"] == 1.0


def test_expected_calibration_error_by_hand():
    # bin 9 (0.9-1.0): confidence 0.95 twice, one right -> |0.95 - 0.5| x 2/4; bin 6: 0.6 twice, both right ->
    # |0.6 - 1.0| x 2/4
    got = ece(np.array([0.95, 0.95, 0.6, 0.6]), np.array([True, False, True, True]))
    assert got == pytest.approx(0.45 * 0.5 + 0.4 * 0.5)
    assert ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0  # confidence 1.0 falls in the last bin


@pytest.mark.slow
def test_compare_two_exports_and_refuse_different_labels(tmp_path, tiny_run, tiny_data):
    """The run's export against a copy with the classifier's output rows swapped (it predicts the other label
    wherever the export is sure): the disagreements and the McNemar counts are those of the prediction files,
    and a model with other labels is refused in one line."""
    import torch
    from safetensors.torch import load_file, save_file

    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_run / "final", flipped)
    weights = load_file(flipped / "model.safetensors")
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = torch.flip(weights[key], dims=[0]).contiguous()
    save_file(weights, flipped / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "cmp"
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", str(tiny_run / "final"), str(flipped),
                          "--data", str(tiny_data), "--split", "test", "--output", str(out), "--resamples", "300"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    (p,) = doc["pairs"]
    rows = {name: [json.loads(line) for line in (out / name / "predictions_test.jsonl").read_text().splitlines()]
            for name in ("model-1", "model-2")}
    right = {k: np.array([r["prediction"] == r["label"] for r in v]) for k, v in rows.items()}
    assert p["rows"] == 29 and (p["only_a_right"], p["only_b_right"]) == (
        int((right["model-1"] & ~right["model-2"]).sum()), int((~right["model-1"] & right["model-2"]).sum()))
    assert p["agreement"] < 0.5  # the swapped head disagrees on most rows
    assert "| model-1 vs model-2 |" in (out / "compare.md").read_text() and "McNemar exact p" in got.stdout
    # slices: each true label, and four length quartiles that cover every row once
    labels = [s for s in doc["slices"] if s.startswith("label = ")]
    quartiles = [s for s in doc["slices"] if s.startswith("length Q")]
    assert len(labels) == 2 and sum(doc["slices"][s]["rows"] for s in labels) == 29
    assert sum(doc["slices"][s]["rows"] for s in quartiles) == 29
    gold_neg = [r["label"] == labels[0].removeprefix("label = ") for r in rows["model-1"]]
    want = np.mean([r["prediction"] == r["label"] for r, g in zip(rows["model-1"], gold_neg) if g])
    assert doc["slices"][labels[0]]["accuracy"]["model-1"] == pytest.approx(want)
    assert all(0 <= m["ece"] <= 1 for m in doc["models"])
    # the same labels in another order: its predictions cannot be set against the others' row by row
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "final", other)
    config = json.loads((other / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(2)]
    config["id2label"], config["label2id"] = {"0": names[1], "1": names[0]}, {names[1]: 0, names[0]: 1}
    (other / "config.json").write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", str(tiny_run / "final"), str(other),
                          "--data", str(tiny_data), "--output", str(tmp_path / "cmp2")], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("llmkit: error: the models classify into different "
                                                          "labels"), bad.stderr[-2000:]
    assert not (tmp_path / "cmp2").exists()  # refused from the models' files, before anything was scored


@pytest.mark.slow
def test_zero_shot_causal_lm_is_scored_and_compared(tmp_path, tiny_lm):
    """`llmkit eval --zero-shot` and `zero-shot:` in compare: any causal LM scores the label words after the
    template, untrained for the task; each row gets one of the words."""
    rows = [{"text": t, "label": lab} for t, lab in (("film good", "positive"), ("film bad", "negative"))] * 5
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tiny_lm / "model")
    cmp = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", f"zero-shot:{model}", f"zero-shot:{model}",
                          "--data", str(data), "--output", str(tmp_path / "cmp"), "--resamples", "200",
                          "--prompt-template", "is this {text}", "--label-words", "negative", "positive"],
                         capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    # each model was scored by `llmkit eval --zero-shot` (compare runs it): one of the words per row
    scored = [json.loads(line) for line in (tmp_path / "cmp" / "model-1" / "predictions_test.jsonl").read_text()
              .splitlines()]
    assert len(scored) == 10 and {r["prediction"] for r in scored} <= {"negative", "positive"}
    assert all(sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5) for r in scored)
    (p,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"]
    assert p["agreement"] == 1.0 and p["mcnemar_exact_p"] == 1.0  # the same model, the same template
    bad = subprocess.run([sys.executable, "-m", "llmkit.cli", "eval", model, "--data", str(data), "--zero-shot"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--zero-shot goes with --prompt-template and --label-words" in bad.stderr
