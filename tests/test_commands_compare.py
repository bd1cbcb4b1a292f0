"""`llmkit compare` (llmkit.commands.compare): the pairwise statistics against scipy and a hand count, and the
command on a real run's export against a copy whose head is flipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import HIGHLIGHTS, chromium
from scipy.stats import binomtest

from llmkit.report.numbers import calibration
from llmkit.report.paired import by_value, disagreements, fit_temperature, length_quartiles, macro_f1, pair, tempered


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


def test_vectorised_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, size=(50, 40)), rng.integers(0, 3, size=(50, 40))
    pred[:10][pred[:10] == 2] = 0  # class 2 never predicted in some rows
    gold[:5][gold[:5] == 1] = 0  # ... and absent from the gold labels in some
    want = [f1_score(g, p, labels=[0, 1, 2], average="macro", zero_division=0) for g, p in zip(gold, pred)]
    assert macro_f1(gold, pred, 3) == pytest.approx(want)


def test_temperature_scaling_by_hand():
    """Every row 0.9 sure and 70% of them right: the temperature that fits brings each confidence to 0.7, so the
    logit margin ln 9 shrinks to ln(7/3): T = ln 9 / ln(7/3), and the calibration error goes from 0.2 to 0."""
    gold = np.array([0] * 70 + [1] * 30)
    probs = np.tile([0.9, 0.1], (100, 1))  # always predicts 0, right on 70 rows
    fit = fit_temperature(probs, gold)
    assert fit["temperature"] == pytest.approx(np.log(9) / np.log(7 / 3), rel=1e-3)
    assert fit["nll_after"] < fit["nll_before"]
    after = tempered(probs, fit["temperature"])
    assert after[:, 0] == pytest.approx(np.full(100, 0.7), abs=1e-3)
    right = (after.argmax(1) == gold).astype(float)
    assert calibration(probs.max(1), right)["ece"] == pytest.approx(0.2)
    assert calibration(after.max(1), right)["ece"] == pytest.approx(0.0, abs=1e-3)


def test_slices_and_disagreements_by_hand():
    quartiles = length_quartiles(np.array([5, 6, 7, 8, 20, 21, 22, 23]))
    assert [m.sum() for m in quartiles.values()] == [2, 2, 2, 2] and list(quartiles)[0] == "length Q1 (5-6 chars)"
    cut = by_value("source", ["web", "news", "web", 3])
    assert list(cut) == ["source = 3", "source = news", "source = web"] and cut["source = web"].tolist() == [
        True, False, True, False]
    a, b = np.array([0, 1, 1, 0, 1]), np.array([1, 1, 0, 0, 0])
    sure_a, sure_b = np.array([0.9, 0.99, 0.6, 0.9, 0.95]), np.array([0.8, 0.99, 0.99, 0.9, 0.7])
    # they disagree on rows 0, 2, 4; the less sure of the two: 0.8, 0.6, 0.7
    assert disagreements(a, b, sure_a, sure_b, 2) == [0, 4]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_run, tiny_data):
    """`llmkit compare` of the run (its directory) against a copy of its export with the classifier's output rows
    swapped (it predicts the other label wherever the export is sure), on test rows that carry a `source`
    column, 2 disagreements per pair explained."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("compare")
    flipped = root / "flipped"
    shutil.copytree(tiny_run / "final", flipped)
    weights = load_file(flipped / "model.safetensors")
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = torch.flip(weights[key], dims=[0]).contiguous()
    save_file(weights, flipped / "model.safetensors", metadata={"format": "pt"})
    data = root / "data"
    shutil.copytree(tiny_data, data)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    (data / "test.jsonl").write_text("".join(json.dumps({**r, "source": "web" if i % 3 else "news"}) + "\n"
                                             for i, r in enumerate(rows)))
    out = root / "cmp"
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", str(tiny_run), str(flipped), "--data",
                          str(data), "--split", "test", "--output", str(out), "--resamples", "300", "--slice-by",
                          "source", "--explain-rows", "2"], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return out, got, data


@pytest.mark.slow
def test_compare_a_run_and_a_flipped_export(compared):
    """The disagreements and McNemar counts are those of the prediction files; the slices (labels, length
    quartiles, the source column) cover the rows; each model gets a temperature fitted on the validation split;
    the most confident disagreements are explained by both models."""
    out, got, _ = compared
    doc = json.loads((out / "compare.json").read_text())
    (p,) = doc["pairs"]
    rows = {name: [json.loads(line) for line in (out / name / "predictions_test.jsonl").read_text().splitlines()]
            for name in ("model-1", "model-2")}
    right = {k: np.array([r["prediction"] == r["label"] for r in v]) for k, v in rows.items()}
    assert p["rows"] == 29 and (p["only_a_right"], p["only_b_right"]) == (
        int((right["model-1"] & ~right["model-2"]).sum()), int((~right["model-1"] & right["model-2"]).sum()))
    assert p["agreement"] < 0.5  # the swapped head disagrees on most rows
    assert p["significant"] == (p["mcnemar_exact_p"] < 0.05) and "at the 5% level" in got.stdout
    assert "| model-1 vs model-2 |" in (out / "compare.md").read_text()
    # slices: each true label, four length quartiles and each source, every family covering the 29 rows once
    for family in ("label = ", "length Q", "source = "):
        assert sum(s["rows"] for name, s in doc["slices"].items() if name.startswith(family)) == 29, family
    news = [r["columns"]["source"] == "news" for r in rows["model-1"]]
    assert sum(news) == 10 and doc["slices"]["source = news"]["accuracy"]["model-1"] == pytest.approx(
        np.mean([ok for ok, n in zip(right["model-1"], news) if n]))
    # calibration: a temperature per model from the validation rows, which each eval scored too
    assert doc["calibration_split"] == "validation"
    for i, m in enumerate(doc["models"]):
        fit = m["temperature"]
        assert fit["fitted_on"] == "validation" and fit["rows"] == 37 and fit["temperature"] > 0
        assert fit["nll_after"] <= fit["nll_before"] + 1e-9 and 0 <= fit["ece_after"] <= 1
        assert (out / f"model-{i + 1}" / "predictions_validation.jsonl").is_file()
        assert [c["label"] for c in m["per_class"]] == doc["labels"] and sum(c["support"] for c in m["per_class"]) == 29
    assert doc["models"][0]["label"] == "run" and doc["models"][1]["label"] == "flipped"
    # the two most confident disagreements, each explained by both models toward the labels
    assert len(doc["disagreements"]) == 2
    for d in doc["disagreements"]:
        a, b = d["predictions"]["model-1"], d["predictions"]["model-2"]
        assert a["prediction"] != b["prediction"]
        assert rows["model-1"][d["row"]]["prediction"] == a["prediction"]
        for v in (a, b):
            assert v["explanation"]["prediction"] == v["prediction"] and set(v["explanation"]["attributions"]) == set(
                doc["labels"])
    sure = [min(d["predictions"]["model-1"]["probability"], d["predictions"]["model-2"]["probability"])
            for d in doc["disagreements"]]
    assert sure == sorted(sure, reverse=True)


@pytest.mark.slow
def test_the_comparison_renders_in_headless_chromium(compared, tmp_path):
    out, _, _ = compared
    with chromium(tmp_path) as page:
        page.get((out / "compare.html").resolve().as_uri())
        words = page.execute_script(HIGHLIGHTS)
        headings = page.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent);")
        cells = page.execute_script("return document.querySelectorAll('td').length;")
        page.save_screenshot(str(tmp_path / "compare.png"))
        errors = [e for e in page.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    assert headings[:4] == ["Models", "Pairs", "Per class", "Slices"] and cells > 40
    assert words and all(shown for shown, _, _ in words)
    assert any(colour not in ("rgba(0, 0, 0, 0)", "transparent") for _, colour, _ in words)
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_refuses_before_scoring(compared, tiny_run, tmp_path):
    """Labels in another order, a missing --slice-by column, a split the data lacks, a temperature asked of a
    single file, a folder that is no classifier: one line each, nothing written."""
    _, _, data = compared
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "final", other)
    config = json.loads((other / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(2)]
    config["id2label"], config["label2id"] = {"0": names[1], "1": names[0]}, {names[1]: 0, names[0]: 1}
    (other / "config.json").write_text(json.dumps(config))
    empty = tmp_path / "empty"
    empty.mkdir()
    final = str(tiny_run / "final")
    cases = [([final, str(other)], [], "the models classify into different labels"),
             ([final, final], ["--slice-by", "nosuch"], "--slice-by nosuch: split 'test' of"),
             ([final, final], ["--split", "dev"], "--split dev:"),
             ([final, final, "--data", str(data / "test.jsonl")], ["--calibration-split", "validation"],
              "--calibration-split validation: the temperature must be fitted on other rows"),
             ([final, str(empty)], [], f"{empty} holds no exported model")]
    for models, more, said in cases:
        if "--data" not in models:
            models = [*models, "--data", str(data)]
        bad = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", *models, "--output",
                              str(tmp_path / "cmp2"), *more], capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
        assert bad.stderr.strip().splitlines()[-1].startswith(f"llmkit: error: {said}"), bad.stderr[-2000:]
        assert not (tmp_path / "cmp2").exists()  # refused from the files, before anything was scored


@pytest.mark.slow
def test_zero_shot_causal_lm_is_scored_and_compared(tmp_path, tiny_lm):
    """`llmkit eval --zero-shot` and `zero-shot:` in compare: any causal LM scores the label words after the
    template, untrained for the task; each row gets one of the words."""
    rows = [{"text": t, "label": lab} for t, lab in (("film good", "positive"), ("film bad", "negative"))] * 5
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tiny_lm / "model")
    cmp = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", f"zero-shot:{model}", f"zero-shot:{model}",
                          "--data", data.name, "--output", "cmp", "--resamples", "200",  # relative to the cwd
                          "--prompt-template", "is this {text}", "--label-words", "negative", "positive"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
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
