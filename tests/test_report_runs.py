"""The report's "What was run" (llmkit.report.runs): the settings that decide the numbers and the run's facts in
words, never raw JSON; and for several runs, the settings in which they differ. Built from small run folders."""

from __future__ import annotations

import html
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


def test_the_report_of_a_rescore_says_the_runs_own_number_and_why(tmp_path):
    """`llmkit eval` of the rows its export's run scored records the run's number (run_reported); the report of
    that eval folder sets it beside the re-score, and says why they differ, in every page."""
    folder = _run(tmp_path / "eval-test", 8e-5, 1.0)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["test"] = {"accuracy": 8 / 12, "run_reported": {
        "accuracy": 0.5833, "run_precision": "bf16", "rows_predicted_differently": 1,
        "why": "the run scored in bf16 during training, this eval in fp32: 1 near-tie row(s) fall the other way"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    paths = pages.build([folder])
    said = ("Against the run's own number: the run reported accuracy 0.5833 on these rows, this re-score 0.6667: "
            "the run scored in bf16 during training, this eval in fp32: 1 near-tie row(s) fall the other way.")
    assert said in paths["md"].read_text() and html.escape(said) in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["runs"][0]["splits"]["test"]["run_reported"]["accuracy"] == 0.5833


def test_report_output_is_new_or_an_earlier_report_replaced_whole(tmp_path):
    """`llmkit report A B --output DIR`: an earlier report there is refused without --overwrite (nothing changes)
    and replaced whole with it; a run's folder or a folder of the user's files never, --overwrite or not."""
    from llmkit.errors import LlmkitError

    a, b = _run(tmp_path / "a", 8e-5, 300.0), _run(tmp_path / "b", 2e-5, 310.0)
    out = tmp_path / "out"
    pages.build([a, b], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [".llmkit-report", "report.html", "report.json", "report.md"]
    with pytest.raises(LlmkitError, match=r"^--output .*out holds an earlier `llmkit report` output; add --overwrite"):
        pages.build([a], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    pages.build([a], out, overwrite=True)
    assert [r["name"] for r in json.loads((out / "report.json").read_text())["runs"]] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # nothing left beside it
    with pytest.raises(LlmkitError, match="is a training run's folder, which `llmkit report` never replaces"):
        pages.build([a, b], b, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LlmkitError, match=r"holds files `llmkit report` did not write \(notes.txt\)"):
        pages.build([a, b], out, overwrite=True)
    pages.build([a], a)  # the run's own folder: its own report, as without --output
