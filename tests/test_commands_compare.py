"""`llmkit compare` (llmkit.commands.compare): the pairwise statistics against scipy and a hand count, and the
command on a real run's export against a copy whose head is flipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import HIGHLIGHTS, chromium, cli, fake_run
from scipy.stats import binomtest

from llmkit.commands.compare import document
from llmkit.errors import LlmkitError
from llmkit.report import paired
from llmkit.report.compared import markdown, verdict, write
from llmkit.report.numbers import calibration
from llmkit.report.paired import by_value, disagreements, fit_temperature, length_quartiles, macro_f1, pair, tempered
from llmkit.report.undefined import not_defined


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
    same = pair(gold, a, a, 2, resamples=200)  # no discordant row: no test, and no interval (every resample is 0)
    assert same["mcnemar_exact_p"] == {"defined": False, "why": "no discordant row: the models are right and wrong "
                                       "on the same rows", "discordant": 0}
    assert same["accuracy_difference_ci95"] == {"defined": False, "why": "every resample gives the same value",
                                                "value": 0.0, "rows": 100}
    assert same["accuracy_difference"] == 0.0 and same["agreement"] == 1.0


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


def test_a_pair_on_too_few_rows_says_so():
    """0 rows: nothing is defined (scipy's bootstrap raised here); 1 row: the differences are that row's, but no
    interval (a resample of one row is that row again)."""
    empty = np.array([], dtype=int)
    got = pair(empty, empty, empty, 3, resamples=200)
    for key in ("accuracy_difference", "accuracy_difference_ci95", "f1_macro_difference", "mcnemar_exact_p",
                "agreement"):
        assert got[key] == {"defined": False, "why": "no rows", "rows": 0}, key
    one = pair(np.array([2]), np.array([2]), np.array([0]), 3, resamples=200)
    assert one["accuracy_difference"] == 1.0 and (one["only_a_right"], one["only_b_right"]) == (1, 0)
    assert one["accuracy_difference_ci95"] == {"defined": False, "why": "too few rows for an interval", "rows": 1}
    assert one["f1_macro_difference_ci95"] == one["accuracy_difference_ci95"]
    assert one["mcnemar_exact_p"] == 1.0  # one discordant row: a test, which cannot reject


def test_temperature_scaling_where_no_temperature_is_best():
    """Every row right: the likelihood keeps growing as T shrinks (the optimiser used to stop near T = 0.04 and
    report it); under two rows: too few to fit."""
    probs = np.tile([0.2, 0.7, 0.1], (30, 1))
    right = fit_temperature(probs, np.ones(30, dtype=int))
    assert right["defined"] is False and right["why"].startswith("the model is right on every row")
    assert (right["rows"], right["right"]) == (30, 30) and "temperature" not in right
    assert fit_temperature(probs[:1], np.array([0])) == {"defined": False, "why": "too few rows to fit a temperature",
                                                         "rows": 1, "right": 0}
    assert fit_temperature(probs[:0], np.array([], dtype=int))["rows"] == 0
    # one wrong row among 30 gives a minimum, inside the range
    gold = np.ones(30, dtype=int)
    gold[0] = 0
    fit = fit_temperature(probs, gold)
    assert fit["right"] == 29 and paired.T_RANGE[0] < fit["temperature"] < 1 and not fit["at_bound"]


def _tested(p: float | dict, ci=(-0.1, 0.1), only=(5, 5)) -> dict:
    return {"a": "model-1", "b": "model-2", "mcnemar_exact_p": p, "accuracy_difference_ci95": list(ci),
            "only_a_right": only[0], "only_b_right": only[1]}


def test_holm_over_the_pairs_by_hand():
    """Raw p 0.01, 0.04, 0.03 (and a pair with no test): sorted, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04
    raised to the 0.06 before it. Only the first pair stays significant; 0.03 and 0.04 alone would have been."""
    pairs = [_tested(0.01), _tested(0.04), _tested(0.03), _tested(not_defined("no discordant row", discordant=0))]
    said = paired.holm(pairs)
    assert said["correction"] == "Holm" and said["family"] == 3
    assert [p["mcnemar_p_holm"] for p in pairs[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert [p["significant"] for p in pairs] == [True, False, False, False]
    assert pairs[3]["mcnemar_p_holm"] == pairs[3]["mcnemar_exact_p"] and "interval_vs_test" not in pairs[3]


def test_an_interval_that_excludes_0_is_not_a_verdict_on_its_own():
    """The issue's case: 4 discordant rows, all one way. The percentile interval excludes 0, McNemar's p is 0.125
    (and no 4 rows could give less): the verdict is the test's and the page says the interval disagrees."""
    gold = np.array([0, 1] * 20)
    a, b = gold.copy(), gold.copy()
    b[:4] = 1 - b[:4]
    p = {"a": "model-1", "b": "model-2", **pair(gold, a, b, 2)}
    assert p["accuracy_difference_ci95"][0] > 0 and p["mcnemar_exact_p"] == pytest.approx(0.125)
    assert paired.holm([p])["family"] == 1 and p["significant"] is False
    assert "4 discordant rows, which can give no p below 0.125" in p["interval_vs_test"]
    doc = {"models": [{"name": "model-1", "label": "a"}, {"name": "model-2", "label": "b"}], "pairs": [p],
           "multiple_testing": {"family": 1}}
    (line,) = verdict(doc)
    assert "not significant at the 5% level" in line and "Note: the accuracy interval excludes 0" in line


def _scored(gold: list[int], predicted: list[int], names: list[str], sources: list[str]) -> dict:
    """A model as compare's scoring leaves it (llmkit.commands.compare.score), without scoring anything: the
    same rows serve as the compared and the calibration split."""
    k, gold, predicted = len(names), np.array(gold), np.array(predicted)
    probs = np.full((len(gold), k), 0.2 / (k - 1))
    probs[np.arange(len(gold)), predicted] = 0.8
    rows = [{"row": i, "text": "w " * (1 + i % 4), "label": names[g], "prediction": names[p],
             "probabilities": probs[i].tolist(), "columns": {"source": sources[i]}}
            for i, (g, p) in enumerate(zip(gold, predicted))]
    split = {"rows": rows, "gold": gold, "predicted": predicted, "probs": probs}
    return {"labels": names, "seconds_per_row": 0.001, "test": split, "validation": split}


NAMES = ["neg", "neutral", "pos"]
GOLD = [0, 2] * 6  # no row of neutral
SOURCES = ["web"] * 11 + ["rare"]  # a value one row has


def test_the_document_of_a_split_without_a_label(tmp_path):
    """A 3-class comparison on rows without `neutral` and a --slice-by value one row has: each number the rows
    cannot give says why with its counts, in compare.json and on the pages; nothing raises."""
    first = _scored(GOLD, GOLD, NAMES, SOURCES)  # right on every row: no temperature is best
    second = _scored(GOLD, [0, 1, 2, 0] * 3, NAMES, SOURCES)
    doc = document([first, second], ["a", "b"], ["a", "b"], "test", "data", "validation", None, ["source"], 400)
    assert doc["errors"] == [] and doc["slice_resamples"] == 100 and doc["bootstrap_resamples"] == 400
    empty = doc["slices"]["label = neutral"]
    assert empty["rows"] == 0 and empty["accuracy"]["model-1"] == {"defined": False, "why": "no rows", "rows": 0}
    assert empty["pairs"][0]["mcnemar_exact_p"]["why"] == "no rows"
    rare = doc["slices"]["source = rare"]
    assert rare["rows"] == 1 and rare["pairs"][0]["accuracy_difference_ci95"] == {
        "defined": False, "why": "too few rows for an interval", "rows": 1}
    m1, m2 = doc["models"]
    assert m1["temperature"]["defined"] is False and (m1["temperature"]["rows"], m1["temperature"]["right"]) == (12, 12)
    assert m1["temperature"]["fitted_on"] == "validation" and m2["temperature"]["temperature"] > 0
    assert m1["accuracy_ci95"]["why"] == "every resample gives the same value" and m1["accuracy_ci95"]["value"] == 1.0
    assert m1["accuracy_ci95_resamples"] == 1000
    neutral = m1["per_class"][1]
    assert neutral["support"] == 0 and neutral["recall"]["why"] == "no row of this class"
    assert neutral["precision"]["why"] == "never predicted" and m2["per_class"][1]["precision"] == 0.0
    (p,) = doc["pairs"]
    assert doc["multiple_testing"]["family"] == 1 and p["mcnemar_p_holm"] == p["mcnemar_exact_p"]
    write(doc, tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text())["slices"]["label = neutral"]["rows"] == 0
    for page in ("compare.md", "compare.html"):
        text = (tmp_path / page).read_text()
        assert "model-1 vs model-2 no rows" in text and "not defined: too few rows for an interval (rows 1)" in text
        assert "not defined: the model is right on every row" in text and "(uncorrected, exploratory)" in text
        assert "accuracy (95% CI, 1000 resamples)" in text and "95% CI, 100 resamples" in text


def test_a_statistic_that_fails_loses_only_its_own_entry(tmp_path, monkeypatch, capsys):
    """An unexpected exception in one slice's pair and in one model's calibration: each is recorded where its
    number would be and said in one line; the other numbers, compare.json and the pages are written."""
    real = paired.pair

    def breaks_on_one_row(gold, *args):
        if len(gold) == 1:
            raise ValueError("boom\nsecond line")
        return real(gold, *args)

    def breaks(*args):
        raise RuntimeError("no fit")

    monkeypatch.setattr(paired, "pair", breaks_on_one_row)
    monkeypatch.setattr(paired, "fit_temperature", breaks)
    scored = [_scored(GOLD, GOLD, NAMES, SOURCES), _scored(GOLD, [0, 1, 2, 0] * 3, NAMES, SOURCES)]
    doc = document(scored, ["a", "b"], ["a", "b"], "test", "data", "validation", None, ["source"], 200)
    assert doc["slices"]["source = rare"]["pairs"][0] == {"a": "model-1", "b": "model-2", "error": "ValueError: boom"}
    assert doc["models"][0] == {"name": "model-1", "model": "a", "label": "a", "error": "RuntimeError: no fit"}
    assert len(doc["errors"]) == 3 and doc["errors"][0] == "model-1 vs model-2 in slice source = rare: ValueError: boom"
    assert doc["pairs"][0]["rows"] == 12 and doc["slices"]["source = web"]["pairs"][0]["rows"] == 11
    said = capsys.readouterr().err.splitlines()
    assert said[0] == ("compare: model-1 vs model-2 in slice source = rare failed (ValueError: boom); compare.json "
                       "records it and keeps the rest") and len(said) == 3
    write(doc, tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text())["errors"] == doc["errors"]
    md = (tmp_path / "compare.md").read_text()
    assert "model-1 vs model-2 failed: ValueError: boom" in md and "failed: RuntimeError: no fit" in md


def test_each_rescore_beside_its_runs_number_and_how_the_runs_differ(tmp_path):
    """A model whose eval re-scored the rows its own run scored shows the run's number beside the re-score, and why
    they differ; the models that are run exports say the training settings in which they differ (not where they
    wrote); models without run records add no such section."""
    import yaml

    folders = []
    for name, rate in (("a", 8e-5), ("b", 2e-5)):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "training_config.yaml").write_text(yaml.safe_dump({
            "train": {"learning_rate": rate, "seed": 1}, "output": {"output_dir": str(tmp_path / name)}}))
        folders.append(str(tmp_path / name))
    first, second = _scored(GOLD, GOLD, NAMES, SOURCES), _scored(GOLD, [0, 1, 2, 0] * 3, NAMES, SOURCES)
    first["run_reported"] = {"accuracy": 0.9167, "run_precision": "bf16", "rows_predicted_differently": 1, "why":
                             "the run scored in bf16 during training, this eval in fp32: 1 near-tie row(s) fall the "
                             "other way"}
    second["run_reported"] = {"accuracy": 0.25, "run_precision": "fp32", "rows_predicted_differently": 0, "why": None}
    doc = document([first, second], folders, ["a", "b"], "test", "data", None, "none", [], 100)
    assert doc["models"][0]["run_reported"] == first["run_reported"] and doc["errors"] == []
    assert doc["differences"] == {"models": ["model-1", "model-2"], "rows": [["train.learning_rate", "8e-05", "2e-05"]]}
    write(doc, tmp_path)
    md, page = (tmp_path / "compare.md").read_text(), (tmp_path / "compare.html").read_text()
    for text in (md, page):
        assert ("model-1 (a): the run reported accuracy 0.9167 on these rows, this re-score 1.0000: the run scored "
                "in bf16 during training, this eval in fp32: 1 near-tie row(s) fall the other way.") in text
        assert "model-2 (b): the run reported the same accuracy on these rows (0.2500): every row is predicted " \
               "alike." in text
    assert "## How the models differ" in md and "| train.learning_rate | 8e-05 | 2e-05 |" in md
    assert "| setting | model-1 (a) | model-2 (b) |" in md
    assert "<h2>How the models differ</h2>" in page and "<td>train.learning_rate</td><td>8e-05</td>" in page
    alike = document([first, second], [folders[0], folders[0]], ["a", "a"], "test", "data", None, "none", [], 100)
    assert "model-1 and model-2 carry the same training settings" in markdown(alike)
    plain = document([first, second], [str(tmp_path / "m1"), str(tmp_path / "m2")], ["m1", "m2"], "test", "data",
                     None, "none", [], 100)
    assert plain["differences"] is None and "training settings" not in markdown(plain)


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compare_replaces_an_earlier_comparison_only_when_asked(tmp_path, tiny_bert, tiny_data, monkeypatch):
    """The training run's rule: an earlier comparison is refused without --overwrite before anything is scored
    (nothing changes); a comparison that fails with --overwrite leaves the earlier one whole, and nothing beside
    it; a folder holding the user's files, or a run's, is never replaced."""
    from llmkit.commands import compare as command

    out = tmp_path / "cmp"
    (out / "model-1").mkdir(parents=True)
    for name in (command.MARKER, "compare.json", "compare.md", "compare.html", "explain-model-1.json",
                 "model-1/metrics.json"):
        (out / name).write_text("earlier")
    before = _tree(out)
    models = [str(_three_labels(tiny_bert, tmp_path / f"m{seed}", seed)) for seed in (0, 1)]
    with pytest.raises(LlmkitError, match=r"^--output .*cmp holds an earlier `llmkit compare` output; add "
                                          "--overwrite to replace it whole"):
        command.compare(models, str(tiny_data), "test", out, [], resamples=100)

    def fails(model, *args):
        raise LlmkitError(f"scoring {model} failed: boom")

    monkeypatch.setattr(command, "score", fails)
    with pytest.raises(LlmkitError, match="scoring .* failed: boom"):
        command.compare(models, str(tiny_data), "test", out, [], resamples=100, calibration_split="none",
                        overwrite=True)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "m0", "m1"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LlmkitError, match=r"holds files `llmkit compare` did not write \(notes.txt\)"):
        command.compare(models, str(tiny_data), "test", out, [], resamples=100, overwrite=True)
    with pytest.raises(LlmkitError, match="is a training run's folder, which `llmkit compare` never replaces"):
        command.compare(models, str(tiny_data), "test", fake_run(tmp_path / "run"), [], resamples=100,
                        overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "run" / "notes.txt").read_text() == "mine"


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
def test_compare_with_overwrite_replaces_the_earlier_comparison_whole(compared, tiny_run, tmp_path):
    """`--overwrite` over an earlier comparison (its explanations and validation scores): the folder then holds
    the new comparison's files only, none of the earlier run's left beside them."""
    out, _, data = compared
    again = tmp_path / "cmp"
    shutil.copytree(out, again)
    assert (again / "explain-model-1.json").is_file() and (again / "model-1" / "predictions_validation.jsonl").is_file()
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", str(tiny_run), str(tiny_run / "final"),
                          "--data", str(data), "--output", str(again), "--overwrite", "--explain-rows", "0",
                          "--calibration-split", "none", "--resamples", "100"], capture_output=True, text=True,
                         timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    assert sorted(p.name for p in again.iterdir()) == [".llmkit-compare", "compare.html", "compare.json", "compare.md",
                                                       "model-1", "model-2"]
    assert not (again / "model-1" / "predictions_validation.jsonl").exists()
    doc = json.loads((again / "compare.json").read_text())
    assert doc["disagreements"] == [] and doc["calibration_split"] is None and doc["pairs"][0]["agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]


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
        bad = cli(["compare", *models, "--output", tmp_path / "cmp2", *more])
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
    assert p["agreement"] == 1.0 and p["mcnemar_exact_p"]["defined"] is False  # the same model, the same template
    bad = cli(["eval", model, "--data", data, "--zero-shot"])
    assert bad.returncode == 2 and "--zero-shot goes with --prompt-template and --label-words" in bad.stderr


def _three_labels(tiny_bert, out, seed: int):
    """The tiny BERT with random weights and a 3-label head (neg, neutral, pos), saved with its tokenizer: a classifier
    that `llmkit eval` scores as it is, no training launch. Drawn wide (initializer_range 0.5), so that two seeds
    predict differently (seeds 0 and 1: 6 of the 29 test rows right for one of them only)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    names = {0: "neg", 1: "neutral", 2: "pos"}
    config = AutoConfig.from_pretrained(tiny_bert, num_labels=3, id2label=names,
                                        label2id={v: k for k, v in names.items()}, initializer_range=0.5)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for path in tiny_bert.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (out / path.name).write_bytes(path.read_bytes())  # the tokenizer files
    return out


@pytest.mark.slow
def test_compare_3_class_models_on_a_split_without_neutral(tmp_path, tiny_bert, tiny_data):
    """The issue's case through `llmkit compare` itself: two 3-class models on test rows with no `neutral` (and a
    --slice-by value one row has). It used to score both models and die in scipy before compare.json; now the
    empty slice and the 1-row slice say why they hold no interval or test, and everything else is there."""
    models = [str(_three_labels(tiny_bert, tmp_path / f"m{seed}", seed)) for seed in (0, 1)]
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    (data / "test.jsonl").write_text("".join(json.dumps({**r, "source": "rare" if i == 0 else "web"}) + "\n"
                                             for i, r in enumerate(rows)))
    out = tmp_path / "cmp"
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "compare", *models, "--data", str(data), "--output",
                          str(out), "--resamples", "400", "--slice-by", "source", "--explain-rows", "0"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["labels"] == ["neg", "neutral", "pos"] and doc["rows"] == 29 and doc["errors"] == []
    empty = doc["slices"]["label = neutral"]
    assert empty["rows"] == 0 and empty["accuracy"]["model-2"] == {"defined": False, "why": "no rows", "rows": 0}
    assert empty["pairs"][0]["accuracy_difference_ci95"]["why"] == "no rows"
    rare = doc["slices"]["source = rare"]
    assert rare["rows"] == 1 and rare["pairs"][0]["accuracy_difference_ci95"] == {
        "defined": False, "why": "too few rows for an interval", "rows": 1}
    assert sum(s["rows"] for name, s in doc["slices"].items() if name.startswith("label = ")) == 29
    for m in doc["models"]:
        (neutral,) = [c for c in m["per_class"] if c["label"] == "neutral"]
        assert neutral["support"] == 0 and neutral["recall"] == {"defined": False, "why": "no row of this class",
                                                                 "support": 0}
        t = m["temperature"]
        assert t["fitted_on"] == "validation" and t["rows"] == 37 and ("temperature" in t) == (t.get("defined", True))
    (p,) = doc["pairs"]
    assert p["only_a_right"] + p["only_b_right"] == 6 and isinstance(p["mcnemar_exact_p"], float)
    assert doc["multiple_testing"]["correction"] == "Holm" and doc["multiple_testing"]["family"] == 1
    assert p["mcnemar_p_holm"] == p["mcnemar_exact_p"] and p["significant"] == (p["mcnemar_p_holm"] < 0.05)
    assert doc["slice_resamples"] == 100 and doc["bootstrap_resamples"] == 400
    md = (out / "compare.md").read_text()
    assert "model-1 vs model-2 no rows" in md and "not defined: too few rows for an interval (rows 1)" in md
    assert "not defined: no row of this class (support 0)" in md and "(uncorrected, exploratory)" in md
    assert "at the 5% level" in got.stdout
    # each model's own eval report (llmkit eval writes one) says why its one-vs-rest ROC AUC has no value
    report = json.loads((out / "model-1" / "report.json").read_text())["runs"][0]["splits"]["test"]
    assert report["roc_auc"]["why"].startswith("no row of neutral") and report["roc_auc"]["support"]["neutral"] == 0
