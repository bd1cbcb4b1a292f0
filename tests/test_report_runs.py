"""The report's "What was run" (llmkit.report.runs): the settings that decide the numbers and the run's facts in
words, never raw JSON; and for several runs, the settings in which they differ. Built from small run folders."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import yaml

from llmkit.report import pages, runs


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(pages, "draw", lambda reports: defaultdict(str))  # the words are in the text


def _run(root, learning_rate: float, seconds: float):
    """A run folder as finish leaves it: predictions, metrics.json, run_info.json, training_config.yaml."""
    root.mkdir(parents=True)
    names = ["negative", "positive"]
    rows = [{"row": i, "text": f"row {i}", "label": names[i % 2], "prediction": names[(i // 3) % 2],
             "probabilities": [0.3, 0.7] if (i // 3) % 2 else [0.8, 0.2]} for i in range(12)]
    (root / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "metrics.json").write_text(json.dumps({"label_names": names, "train": {
        "train_examples": 120, "train_seconds": seconds, "steps": 8, "epochs": 1}}))
    (root / "run_info.json").write_text(json.dumps({"world_size": 2, "precision": "fp32", "versions": {
        "torch": "2.13.0", "transformers": "5.25.0"}}))
    (root / "training_config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "asset:minilm"},
        "data": {"text_column": "review", "label_column": "sentiment", "max_length": 128},
        "train": {"learning_rate": learning_rate, "per_device_batch_size": 16, "class_weights": [1.0, 2.0],
                  "epochs": 1, "seed": 42},
        "lora": {"enabled": False, "r": 16},
        "output": {"output_dir": str(root)}}))
    return root


def _table(md: str, title: str) -> dict[str, list[str]]:
    """A two-or-more column Markdown table under `title`, as first cell -> the other cells."""
    lines = md.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_what_was_run_shows_the_settings_in_words(tmp_path):
    paths = pages.build([_run(tmp_path / "a", 8e-5, 308.9)])
    md, page = paths["md"].read_text(), paths["html"].read_text()
    facts = _table(md, "### What was run")
    assert facts["learning rate"] == ["8e-05"] and facts["batch per device"] == ["16"]
    assert facts["class weights"] == ["1, 2"] and facts["max length"] == ["128"]
    assert facts["text column"] == ["review"] and facts["label column"] == ["sentiment"]
    assert facts["train time"] == ["308.9 s (5 min 9 s)"]
    assert facts["versions"] == ["torch 2.13.0, transformers 5.25.0"]
    assert facts["split rows"] == ["train 120, test 12"]
    assert "LoRA rank" not in facts  # LoRA is off: its rank is not a setting of this run
    assert "{" not in "".join(c for row in facts.values() for c in row)  # no raw JSON
    assert "<td>learning rate</td><td>8e-05</td>" in page


def test_two_runs_say_how_they_differ(tmp_path):
    a, b = _run(tmp_path / "a", 8e-5, 300.0), _run(tmp_path / "b", 2e-5, 310.0)
    paths = pages.build([a, b], tmp_path / "out")
    differ = _table(paths["md"].read_text(), "## How the runs differ")
    assert differ == {"train.learning_rate": ["8e-05", "2e-05"]}  # not output.output_dir: where, not what
    assert "How the runs differ" in paths["html"].read_text()
    assert runs.differences([{"train": {"seed": 1}}, {"train": {"seed": 1}}]) == []  # alike: nothing to list
    assert runs.differences([{"data": {"max_length": 64}}, {}]) == [["data.max_length", "64", "-"]]
