"""Every number means what its label says (issue 46): a binary F1 / precision / recall is named by its positive
class wherever it is shown (report md / html / json, the model card and its model-index, printed lines), more
than two labels say macro and show the macro F1 once, and each quantized copy says what was run to score it.
Built from small in-memory run folders: no training, no launch."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest

from llmkit.config import Config
from llmkit.metrics import averaging, metric_label, scores_line, shown
from llmkit.report import compared, pages
from llmkit.rundir.layout import RunDir

BINARY = ["fraud", "legit"]
THREE = ["bird", "cat", "dog"]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """The pages without their PNGs: matplotlib's first font scan starts a process, and the names are in text."""
    monkeypatch.setattr(pages, "draw", lambda runs: defaultdict(str))


def _rows(names: list[str], n: int = 40, seed: int = 0) -> list[dict]:
    """Prediction rows as a run writes them: mostly right, some wrong, every label present."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        gold = i % len(names)
        pred = gold if rng.random() < 0.7 else int(rng.integers(len(names)))
        probs = rng.dirichlet(np.ones(len(names)))
        probs[[pred, int(np.argmax(probs))]] = probs[[int(np.argmax(probs)), pred]]  # the prediction is the argmax
        rows.append({"row": i, "text": f"row {i}", "label": names[gold], "prediction": names[pred],
                     "probabilities": [round(float(p), 6) for p in probs]})
    return rows


def _run(root, names: list[str], seed: int = 0):
    """A run folder with a test split's predictions and metrics.json (as finish writes it), final/ beside."""
    from llmkit.metrics import classification_metrics

    root.mkdir(parents=True)
    rows = _rows(names, seed=seed)
    (root / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = [names.index(r["label"]) for r in rows]
    pred = [names.index(r["prediction"]) for r in rows]
    metrics = {"label_names": names, **averaging(names),
               "test": {**classification_metrics(pred, gold, len(names)), "samples": len(rows)}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "final").mkdir()
    (root / "final" / "metrics.json").write_text(json.dumps(metrics))
    return root


def _header_cells(md: str) -> list[list[str]]:
    """The header row of every Markdown table, as cells."""
    lines = md.splitlines()
    return [[c.strip() for c in lines[i].strip("|").split("|")] for i in range(len(lines) - 1)
            if lines[i].startswith("|") and lines[i + 1].startswith("|---")]


def test_the_display_name_says_what_a_metric_is_of():
    assert metric_label("f1", BINARY) == "F1 (positive: legit)"
    assert metric_label("precision", BINARY) == "precision (positive: legit)"
    assert metric_label("f1_macro", BINARY) == "F1 (macro)"
    assert metric_label("roc_auc", BINARY) == "ROC AUC"
    assert metric_label("f1", THREE) == metric_label("f1_macro", THREE) == "F1 (macro)"
    assert metric_label("recall", THREE) == "recall (macro)"
    assert metric_label("roc_auc", THREE) == "ROC AUC (one-vs-rest, macro)"
    assert metric_label("accuracy", THREE) == "accuracy" and metric_label("perplexity", None) == "perplexity"
    assert shown(BINARY) == ("accuracy", "f1", "f1_macro", "precision", "recall")
    assert "f1_macro" not in shown(THREE)  # the same number as f1: shown once
    assert averaging(BINARY) == {"f1_average": "binary", "f1_positive_label": "legit"}
    assert averaging(THREE) == {"f1_average": "macro"}
    line = scores_line({"accuracy": 0.9, "f1": 0.8, "f1_macro": 0.85, "samples": 10}, BINARY)
    assert line == "accuracy 0.9000  F1 (positive: legit) 0.8000  F1 (macro) 0.8500  (10 rows)"
    assert scores_line({"accuracy": 0.9, "f1": 0.8, "f1_macro": 0.8}, THREE) == "accuracy 0.9000  F1 (macro) 0.8000"


def test_best_metric_defaults_to_macro_f1():
    assert Config().checkpoint.best_metric == "f1_macro"


@pytest.mark.parametrize("names", [BINARY, ["legit", "fraud"]])
def test_the_binary_report_names_the_positive_class(tmp_path, names):
    """For either label order, md / html / json name the class the binary F1, precision and recall are of."""
    run = _run(tmp_path / "run", names)
    paths = pages.build([run])
    positive = names[1]
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, page):
        for name in ("F1", "precision", "recall"):
            assert f"{name} (positive: {positive})" in text
        assert "F1 (macro)" in text
    s = json.loads(paths["json"].read_text())["runs"][0]["splits"]["test"]
    assert s["f1_positive_label"] == positive and s["f1_average"] == "binary"
    assert f"| F1 (positive: {positive}) | {s['f1']:.4f} | {s['ci95']['f1'][0]:.4f}-" in md
    assert f"| F1 (macro) | {s['f1_macro']:.4f} |" in md
    # no metric row named F1 alone (the per-class table's F1 column is each row's class)
    assert not re.search(r"^\| (F1|macro F1) \|", md, re.M) and "<td>F1</td>" not in page


def test_a_three_class_report_says_macro_and_shows_it_once(tmp_path):
    run = _run(tmp_path / "run", THREE)
    paths = pages.build([run])
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert md.count("| F1 (macro) |") == 1 and page.count("<td>F1 (macro)</td>") == 1
    for name in ("precision (macro)", "recall (macro)", "ROC AUC (one-vs-rest, macro)",
                 "average precision (one-vs-rest, macro)"):
        assert f"| {name} |" in md and f"<td>{name}</td>" in page
    assert "positive:" not in md
    s = json.loads(paths["json"].read_text())["runs"][0]["splits"]["test"]
    assert s["f1_average"] == "macro" and "f1_positive_label" not in s


def test_the_report_comparison_names_the_class(tmp_path):
    a, b = _run(tmp_path / "a", BINARY, seed=1), _run(tmp_path / "b", BINARY, seed=2)
    paths = pages.build([a, b], tmp_path / "out")
    md, page = paths["md"].read_text(), paths["html"].read_text()
    (header,) = [h for h in _header_cells(md) if h[0] == "run"]
    assert "F1 (positive: legit) (95% CI)" in header and "F1 (macro)" in header
    assert "<th>F1 (positive: legit) (95% CI)</th>" in page
    c, d = _run(tmp_path / "c", THREE, seed=1), _run(tmp_path / "d", THREE, seed=2)
    md = pages.build([c, d], tmp_path / "out3")["md"].read_text()
    (header,) = [h for h in _header_cells(md) if h[0] == "run"]
    assert [h for h in header if "F1" in h] == ["F1 (macro) (95% CI)"]  # once, not again as a macro column
    assert "ROC AUC (one-vs-rest, macro)" in header


def test_the_card_and_its_model_index_name_the_class(tmp_path):
    from huggingface_hub import ModelCard

    from llmkit.ship import card

    run = _run(tmp_path / "run", BINARY)
    text = card.build(RunDir(run), run / "final", "classification", "me/fraud")
    (tmp_path / "README.md").write_text(text)
    loaded = ModelCard.load(tmp_path / "README.md")
    got = {r.metric_name: r for r in loaded.data.eval_results}
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert set(got) == {"accuracy", "F1 (positive: legit)", "F1 (macro)", "precision (positive: legit)",
                        "recall (positive: legit)"}
    f1, macro = got["F1 (positive: legit)"], got["F1 (macro)"]
    assert (f1.metric_type, f1.metric_args, f1.metric_value) == ("f1", {"average": "binary", "pos_label": "legit"},
                                                                 pytest.approx(metrics["f1"]))
    assert (macro.metric_type, macro.metric_args, macro.metric_value) == ("f1", {"average": "macro"},
                                                                          pytest.approx(metrics["f1_macro"]))
    assert got["precision (positive: legit)"].metric_args == {"average": "binary", "pos_label": "legit"}
    assert "| split | accuracy | F1 (positive: legit) | F1 (macro) | precision (positive: legit) | " \
           "recall (positive: legit) | rows |" in text
    three = _run(tmp_path / "three", THREE)
    text = card.build(RunDir(three), three / "final", "classification", "me/pets")
    (tmp_path / "README.md").write_text(text)
    got = {r.metric_name: r for r in ModelCard.load(tmp_path / "README.md").data.eval_results}
    assert set(got) == {"accuracy", "F1 (macro)", "precision (macro)", "recall (macro)"}  # macro F1 once
    assert got["F1 (macro)"].metric_args == {"average": "macro"}
    assert "| split | accuracy | F1 (macro) | precision (macro) | recall (macro) | rows |" in text


def test_compare_pages_label_every_f1(tmp_path):
    """`llmkit compare` shows the macro F1 only (models, pairs) and each class's own F1: every F1 column says
    macro, or sits in the per-class table, for two labels as for three."""
    from llmkit.commands.compare import document

    for names in (BINARY, THREE):
        scored = []
        for seed in (1, 2):
            rows = _rows(names, seed=seed)
            scored.append({"labels": names, "seconds_per_row": 0.001, "test": {
                "rows": rows, "gold": np.array([names.index(r["label"]) for r in rows]),
                "predicted": np.array([names.index(r["prediction"]) for r in rows]),
                "probs": np.array([r["probabilities"] for r in rows])}})
        doc = document(scored, ["/m1", "/m2"], ["m1", "m2"], "test", "d", None, "no validation split", [], 100)
        md, page = compared.markdown(doc), compared.page(doc)
        f1_headers = [(h, c) for h in _header_cells(md) for c in h if "F1" in c]
        assert f1_headers and all("macro" in c or "class" in h for h, c in f1_headers), f1_headers
        assert all("macro" in c or c == "F1" for c in re.findall(r"<th>([^<]*F1[^<]*)</th>", page))
        assert "positive:" not in md  # no binary F1 on these pages to name


def _copy(final, fmt: str, numbers: dict) -> None:
    folder = final.parent / f"final-{fmt}"
    folder.mkdir()
    (folder / "quantized.json").write_text(json.dumps({"format": fmt, "split": "test", "rows": 40,
                                                       "size_ratio": 2.0, "size_ratio_to_fp32": 4.0, **numbers}))


def test_each_quantized_copy_says_what_was_run(tmp_path):
    """onnx-int8: onnxruntime, its speed-up against PyTorch fp32 eager; GGUF: transformers' reader, dequantized,
    llama.cpp not run; torchao-int8: PyTorch with torchao. In the report (md and html) and the card."""
    from llmkit.ship import card

    run = _run(tmp_path / "run", BINARY)
    classified = {"full": {"accuracy": 0.9, "f1_macro": 0.9, "bytes": 100, "parameters": 25},
                  "copy": {"accuracy": 0.9, "f1_macro": 0.9, "bytes": 50}, "agreement": 1.0,
                  "accuracy_change": 0.0, "f1_macro_change": 0.0}
    _copy(run / "final", "onnx-int8", {**classified, "speedup_batch_1": 2.0, "speedup_batch_32": 1.5})
    for fmt in ("gguf-f16", "gguf-q8_0", "torchao-int8"):
        _copy(run / "final", fmt, {"full": {"perplexity": 5.0, "bytes": 100, "parameters": 25},
                                   "copy": {"perplexity": 5.1, "bytes": 50}, "perplexity_change": 0.02})
    paths = pages.build([run])
    text = card.build(RunDir(run), run / "final", "classification", "me/fraud")
    for shown_in in (paths["md"].read_text(), paths["html"].read_text().replace("&#x27;", "'"), text):
        assert "runtime that serves" not in shown_in
        assert "onnx-int8: run by onnxruntime" in shown_in or "`onnx-int8/`" in shown_in
        assert "against the full model in PyTorch fp32 eager, so it includes the change of runtime" in shown_in
        assert shown_in.count("read by transformers' GGUF reader") == 2  # f16 and q8_0
        assert "llama.cpp (with its 8-bit activations) is not run" in shown_in
        assert "llama.cpp is not run and no speed-up is measured" in shown_in
        assert "run by PyTorch with torchao's int8 weight-only linear layers" in shown_in
    assert "speed-up per row over PyTorch fp32" in paths["md"].read_text()
