"""`llmkit eval` (llmkit.commands.eval_model): any exported classifier scored on a labelled split, with a report;
what it refuses."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import LAUNCH_ENV, fake_run, read_jsonl, write_jsonl

from llmkit.errors import LlmkitError
from llmkit.report import pages


def test_eval_refuses_a_causal_lm_without_its_label_words(tmp_path, tiny_lm, tiny_data):
    """A causal LM scores labels only through the prompt template and label words its run recorded beside it."""
    from llmkit.commands.eval_model import eval_export

    with pytest.raises(LlmkitError, match="is a causal LM without the run records that name its prompt template"):
        eval_export(tiny_lm / "model", str(tiny_data), "test", tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_a_base_model_and_a_runs_folder(tmp_path, tiny_bert, tiny_data):
    from transformers import AutoConfig, BertModel

    from llmkit.commands.eval_model import eval_export

    base = tmp_path / "base"
    BertModel(AutoConfig.from_pretrained(tiny_bert)).save_pretrained(base)  # an encoder without a trained head
    for f in tiny_bert.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (base / f.name).write_bytes(f.read_bytes())  # the tokenizer
    with pytest.raises(LlmkitError, match="is not a fine-tuned classifier: .* would be random"):
        eval_export(base, str(tiny_data), "test", max_length=32)
    assert not (base / "eval-test").exists()  # nothing written
    run = fake_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(LlmkitError, match="is a training run's folder"):
        eval_export(tiny_bert, str(tiny_data), "test", run, max_length=32)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    data = tmp_path / "ids.jsonl"  # integer labels, as the tiny BERT's LABEL_0 / LABEL_1 expect
    data.write_text("".join(json.dumps({"text": f"good film {i}", "label": i % 2}) + "\n" for i in range(8)))
    out = tmp_path / "ev"
    eval_export(tiny_bert, str(data), "test", out, max_length=32)
    eval_export(tiny_bert, str(data), "test", out, max_length=32)  # an earlier eval's folder: fine


@pytest.mark.slow
def test_llmkit_eval_scores_any_exported_classifier(tiny_run, tiny_bert, tiny_data, tmp_path):
    # llmkit's own export on the test file: the same numbers as the run
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "eval", str(tiny_run / "final"), "--data",
                           str(tiny_data / "test.jsonl"), "--split", "test", "--output", str(out), "--max-length",
                           "32"], capture_output=True, text=True, env=LAUNCH_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.html'}" in proc.stdout
    run_metrics = json.loads((tiny_run / "metrics.json").read_text())["test"]
    got = json.loads((out / "metrics.json").read_text())["test"]
    assert got["accuracy"] == pytest.approx(run_metrics["accuracy"])
    assert got["f1"] == pytest.approx(run_metrics["f1"])
    assert [r["prediction"] for r in read_jsonl(out / "predictions_test.jsonl")] == \
        [r["prediction"] for r in read_jsonl(tiny_run / "predictions_test.jsonl")]

    # a classifier llmkit never saw (integer labels, default LABEL_i names), data as a folder of splits
    data = tmp_path / "intdata"
    data.mkdir()
    rows = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in read_jsonl(tiny_data / "test.jsonl")]
    write_jsonl(data / "test.jsonl", rows)
    from llmkit.commands.eval_model import eval_export

    res = eval_export(tiny_bert, str(data), "test", tmp_path / "foreign", max_length=32)
    doc = json.loads((tmp_path / "foreign" / "report.json").read_text())
    assert doc["runs"][0]["label_names"] == ["LABEL_0", "LABEL_1"]
    assert doc["runs"][0]["splits"]["test"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])

    # two runs in one report: a comparison table and overlaid curves
    both = tmp_path / "both"
    paths = pages.build([tiny_run, out], both)
    doc = json.loads(paths["json"].read_text())
    assert [c["run"] for c in doc["comparison"]] == ["run", "eval"]
    assert "## Comparison" in paths["md"].read_text()
    page = paths["html"].read_text()
    assert {"confusion_run", "confusion_eval"} <= set(re.findall(r'data-plot="([^"]+)"', page))
