"""The evaluation report: every number re-derived with scikit-learn from the saved predictions, a self-contained
HTML page that headless Chromium renders without console errors, TensorBoard scalars."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers import HIGHLIGHTS, chromium, read_jsonl
from sklearn import metrics as sk

from llmkit.errors import LlmkitError
from llmkit.report import pages

pytestmark = pytest.mark.slow

PLOTS = {"roc", "pr", "calibration", "training"}


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
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[c], r[c], f[c]))
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
        assert s["ci95"]["accuracy"] == pytest.approx([np.percentile(accs, 2.5), np.percentile(accs, 97.5)])
        assert s["ci95"]["f1"] == pytest.approx([np.percentile(f1s, 2.5), np.percentile(f1s, 97.5)])
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
        lo, hi = s["ci95"]["f1"]
        assert f"{lo:.4f}-{hi:.4f}" in md
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
