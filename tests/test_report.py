"""The evaluation report: every number re-derived with scikit-learn from the saved predictions, a self-contained
HTML page that headless Chromium renders without console errors, TensorBoard scalars."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pytest
from helpers import HIGHLIGHTS, build_three_class_run, chromium, read_jsonl
from sklearn import metrics as sk

from llmkit.errors import LlmkitError
from llmkit.report import pages
from llmkit.report.undefined import interval

pytestmark = pytest.mark.slow

PLOTS = {"roc", "pr", "calibration", "training", "datamap_run"}  # and the run's confusion matrix


def _ece(conf, correct, bins=10):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if mask.any():
            total += mask.sum() / len(conf) * abs(correct[mask].mean() - conf[mask].mean())
    return total


def test_report_numbers_match_scikit_learn(tiny_run):
    doc = json.loads((tiny_run / "report.json").read_text())
    (run,) = doc["runs"]
    assert run["primary_split"] == "test" and set(run["splits"]) == {"test", "validation"}
    names = run["label_names"]
    assert names == ["neg", "pos"]
    for split in ("test", "validation"):
        s = run["splits"][split]
        rows = read_jsonl(tiny_run / f"predictions_{split}.jsonl")
        y = np.array([names.index(r["label"]) for r in rows])
        pred = np.array([names.index(r["prediction"]) for r in rows])
        prob = np.array([r["probabilities"] for r in rows])
        assert s["rows"] == len(rows) == {"test": 29, "validation": 37}[split]
        assert s["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
        assert s["f1"] == pytest.approx(sk.f1_score(y, pred, zero_division=0))
        assert s["f1_macro"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))
        assert s["precision"] == pytest.approx(sk.precision_score(y, pred, zero_division=0))
        assert s["recall"] == pytest.approx(sk.recall_score(y, pred, zero_division=0))
        p, r, f, support = sk.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
        for c, row in enumerate(s["per_class"]):
            assert row["label"] == names[c]
            # a class never predicted has no precision (scikit-learn's 0.0 there is its zero_division stand-in)
            never = {"defined": False, "why": "never predicted", "predicted": 0}
            assert row["precision"] == (pytest.approx(p[c]) if (pred == c).any() else never)
            assert (row["recall"], row["f1"]) == pytest.approx((r[c], f[c]))  # every class has rows here
            assert row["support"] == support[c]
        assert s["confusion_matrix"] == sk.confusion_matrix(y, pred).tolist()
        assert s["roc_auc"] == pytest.approx(sk.roc_auc_score(y, prob[:, 1]))
        assert s["average_precision"] == pytest.approx(sk.average_precision_score(y, prob[:, 1]))
        conf = prob.max(1)
        assert s["ece"] == pytest.approx(_ece(conf, (pred == y).astype(float)))
        # the bootstrap, redone with scikit-learn on the same resamples (seed 0, 1000 draws)
        rng = np.random.default_rng(0)
        accs, f1s = [], []
        for _ in range(1000):
            idx = rng.integers(0, len(y), len(y))
            accs.append(sk.accuracy_score(y[idx], pred[idx]))
            f1s.append(sk.f1_score(y[idx], pred[idx], zero_division=0))
        for key, values in (("accuracy", accs), ("f1", f1s)):
            if np.ptp(values) == 0:  # e.g. class 1 never predicted: F1 0 in every resample, which is no interval
                assert s["ci95"][key] == {"defined": False, "why": "every resample gives the same value",
                                          "value": values[0], "rows": len(y)}, key
            else:
                assert s["ci95"][key] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)])
        assert s["ci95"]["resamples"] == 1000
        assert s["ci95"]["accuracy"][0] <= s["accuracy"] <= s["ci95"]["accuracy"][1]
        # the most confident mistakes: wrong rows only, by decreasing probability
        wrong = sorted((conf[i] for i in range(len(rows)) if pred[i] != y[i]), reverse=True)
        mistakes = s["confident_mistakes"]
        assert [m["probability"] for m in mistakes] == pytest.approx(wrong[:10])
        assert all(m["label"] != m["prediction"] and rows[m["row"]]["text"] == m["text"] for m in mistakes)
    # the run's own metrics agree with the report
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(run["splits"]["test"]["accuracy"])
    facts = run["run"]
    assert (facts["world_size"], facts["zero_stage"], facts["precision"]) == (2, 2, "fp32")
    assert facts["steps"] == metrics["train"]["steps"] and facts["split_rows"]["train"] == 96
    assert facts["versions"]["torch"] and facts["versions"]["deepspeed"] and facts["train_seconds"] > 0
    # curves come from metrics.jsonl: train loss every logging step, eval loss every eval
    assert len(run["curves"]["train_loss"]) >= 3 and len(run["curves"]["eval_loss"]) >= 3
    assert len(run["curves"]["learning_rate"]) == len(run["curves"]["train_loss"])


def test_html_is_self_contained_and_markdown_shows_the_same_numbers(tiny_run):
    page = (tiny_run / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)  # nothing fetched from a network
    assert "<script" not in page and "@import" not in page
    shown = set(re.findall(r'data-plot="([^"]+)"\s+alt="[^"]*"\s+src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"',
                           page))
    assert shown == PLOTS | {"confusion_run"}
    doc = json.loads((tiny_run / "report.json").read_text())
    md = (tiny_run / "report.md").read_text()
    for split, s in doc["runs"][0]["splits"].items():
        for key in ("accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc", "ece"):
            assert f"{s[key]:.4f}" in md, (split, key)
            assert f"{s[key]:.4f}" in page, (split, key)
        assert interval(s["ci95"]["f1"]) in md and interval(s["ci95"]["f1"]) in html.unescape(page)
    # the explained rows (output.explain_rows, default 8): the test split's most confident mistakes first
    why = doc["runs"][0]["explanations"]
    assert why["split"] == "test" and len(why["rows"]) == 8 and why["seconds"] > 0
    predictions = {r["row"]: r for r in read_jsonl(tiny_run / "predictions_test.jsonl")}
    for row in why["rows"]:
        assert row["prediction"] == predictions[row["row"]]["prediction"]
        assert set(row["attributions"]) == {"neg", "pos"} and all(len(v) == len(row["words"])
                                                                 for v in row["attributions"].values())
        assert " ".join(row["words"]) == row["text"]  # the tiny vocabulary's words, each whole
        assert max(row["delta"].values()) < 0.05
    assert f"Why the model said that (test, 8 rows, {why['seconds']:.1f} s)" in md
    assert page.count("<td class='why'>") == 8 and "pushes toward pos" in page and "pushes toward neg" in page


def test_every_training_row_is_recorded_once_per_epoch_and_mapped(tiny_run, tiny_data):
    """Issue 49 on a real 2-rank ZeRO-2 run of 3 epochs: the training dynamics hold each of the 96 training rows
    exactly once per epoch, keyed by its row in the train file, from the steps of that epoch; the report shows the
    data map and the suspects with their texts."""
    records = np.load(tiny_run / "training_dynamics.npy")
    train = read_jsonl(tiny_data / "train.jsonl")
    for epoch in range(3):
        these = records[records["epoch"] == epoch]
        assert sorted(these["row"].tolist()) == list(range(96)), epoch
        assert ((these["step"] > 6 * epoch) & (these["step"] <= 6 * (epoch + 1))).all()  # 6 steps an epoch
    assert len(records) == 3 * 96 and np.isin(records["predicted"], [0, 1]).all()
    assert all(["neg", "pos"][r["label"]] == train[r["row"]]["label"] for r in records)
    assert ((records["gold_prob"] > 0) & (records["gold_prob"] < 1)).all()
    assert ((records["margin"] > 0) == (records["predicted"] == records["label"])).all()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["train"]["training_dynamics"]["scores"] == "softmax of the classifier's logits"
    mapped = json.loads((tiny_run / "report.json").read_text())["runs"][0]["data_map"]
    assert (mapped["rows"], mapped["train_rows"], mapped["epochs"]) == (96, 96, {"most": 3, "fewest": 3})
    assert sum(mapped["regions"].values()) == 96 and mapped["rows_of_one_epoch"] == 0
    suspects = mapped["suspects"]
    assert len(suspects) == 20 and [s["aum"] for s in suspects] == sorted(s["aum"] for s in suspects)
    assert all(s["text"] == train[s["row"]]["text"] and s["label"] == train[s["row"]]["label"] for s in suspects)
    md, page = (tiny_run / "report.md").read_text(), (tiny_run / "report.html").read_text()
    assert "### Training data map" in md and "Training rows most likely mislabeled (lowest AUM first, 20)" in md
    assert f"| {suspects[0]['row']} | {suspects[0]['text']} | {suspects[0]['label']} |" in md
    assert "<h3>Training data map</h3>" in page and "Variability is not measured" not in page


def test_tensorboard_has_the_training_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tiny_run / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/real_tokens_per_s", "train/samples_per_s",
                "eval/accuracy", "eval/f1", "eval/loss"):
        assert tag in tags, (tag, sorted(tags))
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train/loss"] for e in logged if "train/loss" in e]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)


def test_report_and_eval_errors_are_clear(tmp_path, tiny_run):
    with pytest.raises(LlmkitError, match="has neither predictions_<split>.jsonl nor language-model scores"):
        pages.build([tmp_path])
    with pytest.raises(LlmkitError, match="does not exist"):
        pages.build([tmp_path / "nope"])
    with pytest.raises(LlmkitError, match="with several runs, say where the report goes"):
        pages.build([tiny_run, tiny_run])
    from llmkit.commands.eval_model import eval_export

    with pytest.raises(LlmkitError, match="has no config.json"):
        eval_export(tmp_path, "x.jsonl")


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    with chromium(tmp_path) as page:
        page.get((tiny_run / "report.html").resolve().as_uri())
        loaded = page.execute_script(
            "return Array.from(document.images).map(i => [i.dataset.plot, i.complete && i.naturalWidth > 0]);")
        # the explained rows' words: laid out, with the highlight drawn (a background or an underline)
        words = page.execute_script(HIGHLIGHTS)
        page.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in page.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    assert {name for name, ok in loaded if ok} == PLOTS | {"confusion_run"}, loaded
    assert all(ok for _, ok in loaded)
    assert words and all(shown for shown, _, _ in words)
    assert any(style == "solid" for _, _, style in words) and any(style == "dotted" for _, _, style in words)
    assert any(colour not in ("rgba(0, 0, 0, 0)", "transparent") for _, colour, _ in words)
    assert (tmp_path / "report.png").stat().st_size > 10_000  # a rendered page, not a blank one


# per explained row of the report: its words' cell shown, what it was predicted, and its key's two lines with how
# each is drawn (text, underline style, background)
ROW_KEYS = ("return Array.from(document.querySelectorAll('tr')).filter(r => r.querySelector('td.why')).map(r => {"
            "const c = r.querySelectorAll('td'); const w = r.querySelector('td.why').getBoundingClientRect(); "
            "return [w.width > 0 && w.height > 0, c[3].textContent, Array.from(r.querySelectorAll('td.key span'))"
            ".map(s => {const st = getComputedStyle(s); return [s.innerText, st.borderBottomStyle, "
            "st.backgroundColor];})];});")


def test_a_three_class_report_names_each_rows_class_in_headless_chromium(tmp_path):
    """Issue 47: the report of a 3-class run (built in this process, no launch) shows, beside each explained row,
    a key naming that row's own predicted class: green toward it, red away from it; no "toward against"."""
    run = build_three_class_run(tmp_path / "run")
    paths = pages.build([run])
    why = json.loads(paths["json"].read_text())["runs"][0]["explanations"]
    with chromium(tmp_path) as page:
        page.get(paths["html"].resolve().as_uri())
        rows = page.execute_script(ROW_KEYS)
        legend = page.execute_script("return Array.from(document.querySelectorAll('p.legend')).map(p => p.innerText);")
        errors = [e for e in page.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    assert len(rows) == len(why["rows"]) == 6 and len({r["prediction"] for r in why["rows"]}) == 3
    for (shown, predicted, key), row in zip(rows, why["rows"]):
        assert shown and predicted.split()[0] == row["prediction"]
        (green, up, up_colour), (red, down, _) = key
        assert (green, red) == (f"toward {row['prediction']} (the prediction)", f"away from {row['prediction']}")
        assert (up, down) == ("solid", "dotted") and up_colour not in ("rgba(0, 0, 0, 0)", "transparent")
    (text,) = legend
    assert "pushes toward the row's predicted class" in text and "against" not in text
    assert ("raised (doubled, up to" in text) == any(r["steps"] > why["steps"] for r in why["rows"])


def test_a_torn_last_line_does_not_stop_the_report(tiny_run, tmp_path):
    """The run killed while writing its last metrics and predictions lines: `llmkit report` skips each torn
    last line and lists the files it skipped one in."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "train/lo')
    with open(run / "predictions_test.jsonl", "a") as fh:
        fh.write('{"row": 99, "text": "cut')
    paths = pages.build([run])
    doc = json.loads(paths["json"].read_text())["runs"][0]
    assert doc["run"]["torn_last_line_skipped"] == ["metrics.jsonl", "predictions_test.jsonl"]
    assert doc["splits"]["test"]["rows"] == 29


def test_report_statistics_where_the_rows_cannot_give_them(tmp_path):
    """Each number of the run's report that its rows cannot give says why, with counts, in report.json and on the
    pages: an interval of 1 row or of rows all right (every resample the same), ROC AUC of one class, one-vs-rest
    of a split without a label, per-class scores of a class without rows or never predicted, ECE of no rows."""
    from llmkit.report.numbers import bootstrap, calibration, per_class, ranking

    one = bootstrap(np.array([1]), np.array([1]), 2)
    assert one == {"accuracy": {"defined": False, "why": "too few rows for an interval", "rows": 1},
                   "f1": {"defined": False, "why": "too few rows for an interval", "rows": 1}, "resamples": 1000}
    right = bootstrap(np.array([0, 1] * 5), np.array([0, 1] * 5), 2)
    assert right["accuracy"] == {"defined": False, "why": "every resample gives the same value", "value": 1.0,
                                 "rows": 10}
    half = bootstrap(np.array([0, 1] * 5), np.array([0, 1] * 4 + [1, 0]), 2)
    assert half["accuracy"][0] < 0.8 < half["accuracy"][1]  # rows that differ: an interval as before

    probs = np.tile([0.3, 0.7], (6, 1))
    negatives = ranking(np.zeros(6, dtype=int), probs, ["neg", "pos"])
    assert negatives["roc_auc"] == negatives["average_precision"] == {"defined": False, "why": "no row of pos",
                                                                      "rows": 6}
    assert negatives["_curves"] == {"roc": [], "pr": []}
    positives = ranking(np.ones(6, dtype=int), probs, ["neg", "pos"])
    assert positives["roc_auc"] == {"defined": False, "why": "every row is pos", "rows": 6}
    assert positives["average_precision"] == pytest.approx(sk.average_precision_score(np.ones(6), probs[:, 1]))

    y = np.array([0, 2, 0, 2, 2, 0])
    three = np.array([[0.6, 0.1, 0.3], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4],
                      [0.2, 0.2, 0.6]])
    got = ranking(y, three, ["neg", "neutral", "pos"])
    assert got["roc_auc"] == {"defined": False, "why": "no row of neutral: one-vs-rest needs rows in and out of "
                              "every class", "support": {"neg": 3, "neutral": 0, "pos": 3}}
    assert [c[0] for c in got["_curves"]["roc"]] == ["neg", "pos"]  # the classes that have a curve are still drawn
    assert got["_curves"]["roc"][0][3] == pytest.approx(sk.roc_auc_score(y == 0, three[:, 0]))

    (neg, neutral, pos) = per_class(y, three.argmax(1), ["neg", "neutral", "pos"])  # neutral predicted once
    assert neutral["support"] == 0 and neutral["precision"] == 0.0
    assert neutral["recall"] == {"defined": False, "why": "no row of this class", "support": 0}
    assert neutral["f1"] == 0.0  # predicted and never right: 0, as scikit-learn counts it
    assert per_class(y, np.zeros(6, dtype=int), ["neg", "neutral", "pos"])[2]["precision"] == {
        "defined": False, "why": "never predicted", "predicted": 0}
    assert calibration(np.array([]), np.array([]))["ece"] == {"defined": False, "why": "no rows", "rows": 0}

    # an eval output of one row: its report says why each interval and the ROC AUC have no value
    (tmp_path / "predictions_test.jsonl").write_text(json.dumps(
        {"row": 0, "text": "good film", "label": "pos", "prediction": "pos", "probabilities": [0.1, 0.9]}) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    paths = pages.build([tmp_path])
    split = json.loads(paths["json"].read_text())["runs"][0]["splits"]["test"]
    assert split["ci95"]["accuracy"]["why"] == "too few rows for an interval" and split["roc_auc"]["rows"] == 1
    for page in ("md", "html"):
        text = paths[page].read_text()
        assert "not defined: too few rows for an interval (rows 1)" in text, page
        assert "not defined: every row is pos (rows 1)" in text and "not defined: never predicted (predicted 0)" in text
