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
    eval_export(tiny_bert, str(data), "test", tmp_path / "ev", max_length=32)  # a new folder


def test_eval_replaces_an_earlier_eval_only_when_asked_and_whole(tmp_path, tiny_bert, monkeypatch):
    """The training run's rule: an earlier eval's folder is refused without --overwrite (nothing changes); with it
    the folder holds only the new eval's files (none of the earlier splits); an eval that fails with --overwrite
    leaves the earlier one as it was; a folder of the user's files is never replaced."""
    from llmkit.commands.eval_model import eval_export

    data = tmp_path / "data"
    data.mkdir()
    for split in ("test", "validation"):
        write_jsonl(data / f"{split}.jsonl", [{"text": f"good film {i}", "label": i % 2} for i in range(6)])
    out = tmp_path / "ev"
    eval_export(tiny_bert, str(data), ["test", "validation"], out, max_length=32)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LlmkitError, match=r"^--output .*ev holds an earlier `llmkit eval` output; add --overwrite"):
        eval_export(tiny_bert, str(data), "test", out, max_length=32)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def fails(*args, **kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(pages, "build", fails)  # the last step of writing the new folder
    with pytest.raises(RuntimeError, match="the report failed"):
        eval_export(tiny_bert, str(data), "test", out, max_length=32, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ev"]  # no half-built folder left beside it
    monkeypatch.undo()

    eval_export(tiny_bert, str(data), "test", out, max_length=32, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".llmkit-eval", "metrics.json", "predictions_test.jsonl",
                                                     "report.html", "report.json", "report.md", "run_info.json"]
    assert "validation" not in json.loads((out / "metrics.json").read_text())
    (out / "notes.txt").write_text("mine")  # the user's file in it: never replaced
    with pytest.raises(LlmkitError, match=r"holds files `llmkit eval` did not write \(notes.txt\)"):
        eval_export(tiny_bert, str(data), "test", out, max_length=32, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


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


def _three_class(root, tiny_bert):
    """The tiny BERT with a 3-label head, exported with run records that name its columns (review / sentiment)."""
    import yaml
    from transformers import AutoConfig, AutoModelForSequenceClassification

    names = ["negative", "neutral", "positive"]
    config = AutoConfig.from_pretrained(tiny_bert, num_labels=3, id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    final = root / "final"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(final)
    for f in tiny_bert.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (final / f.name).write_bytes(f.read_bytes())  # the tokenizer
    (final / "training_config.yaml").write_text(yaml.safe_dump({"data": {
        "text_column": "review", "label_column": "sentiment", "max_length": 32}}))
    return final


def test_eval_matches_the_datas_labels_to_the_models_by_name(tmp_path, tiny_bert):
    """Class ids are the model's ids only when they are exactly its ids: 0/1 on a 3-label model is refused (it
    scored gold 1 as `neutral`), or mapped by --label-map; names the model does not know are refused; a subset of
    its names is scored and said. Columns not given are the run's (review / sentiment), and a missing one is named
    by the command's flag."""
    from llmkit.commands.eval_model import eval_export

    final = _three_class(tmp_path, tiny_bert)
    ids = tmp_path / "ids.jsonl"
    write_jsonl(ids, [{"review": f"good film {i}", "sentiment": i % 2} for i in range(8)])
    with pytest.raises(LlmkitError, match=r"holds the class ids \[0, 1\], but the model has 3 labels .*--label-map "
                                          r"0=<label> 1=<label>"):
        eval_export(final, str(ids), "test", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    words = tmp_path / "words.jsonl"
    write_jsonl(words, [{"review": "good film", "sentiment": "great"}, {"review": "bad film", "sentiment": "negative"}])
    with pytest.raises(LlmkitError, match="has the label 'great', which the model does not know"):
        eval_export(final, str(words), "test", tmp_path / "b")
    with pytest.raises(LlmkitError, match="--label-map maps to 'good', which is not one of the model's labels"):
        eval_export(final, str(ids), "test", tmp_path / "c", label_map={"0": "negative", "1": "good"})
    with pytest.raises(LlmkitError, match="no column 'text' .* --text-column"):
        eval_export(final, str(ids), "test", tmp_path / "d", text_column="text")

    got = eval_export(final, str(ids), "test", tmp_path / "e", label_map={"0": "negative", "1": "positive"})
    assert got["metrics"]["labels_in_data"] == {"negative": 4, "neutral": 0, "positive": 4}
    gold = [r["label"] for r in read_jsonl(tmp_path / "e" / "predictions_test.jsonl")]
    assert sorted(set(gold)) == ["negative", "positive"]
    write_jsonl(words, [{"review": "good film", "sentiment": "positive"}, {"review": "bad film", "sentiment": "negative"}])
    got = eval_export(final, str(words), "test", tmp_path / "f")
    assert got["metrics"]["labels_in_data"] == {"negative": 1, "neutral": 0, "positive": 1}


def test_a_rescore_that_moves_from_the_runs_number_says_why(tmp_path):
    """The export's own run scored these rows (same data, split, row count): its number and the rows the two
    scorings predict differently are recorded, and a difference is explained (near ties under another
    precision); rows the run did not score are not set against it."""
    import numpy as np
    import yaml

    from llmkit.commands.eval_model import _against_run

    run, names = tmp_path / "run", ["negative", "positive"]
    (run / "final").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    (run / "training_config.yaml").write_text(yaml.safe_dump({"data": {"dataset": str(data), "test_split": "test"}}))
    (run / "metrics.json").write_text(json.dumps({"label_names": names, "test": {"accuracy": 0.75, "samples": 4}}))
    (run / "run_info.json").write_text(json.dumps({"precision": "bf16"}))
    write_jsonl(run / "predictions_test.jsonl", [{"row": i, "prediction": names[p]} for i, p in enumerate([0, 1, 1, 0])])
    got = _against_run(run / "final", str(data), "test", np.array([0, 1, 0, 0]), names, "fp32")
    assert got["accuracy"] == 0.75 and got["rows_predicted_differently"] == 1
    assert got["why"] == "the run scored in bf16 during training, this eval in fp32: 1 near-tie row(s) fall the other way"
    assert _against_run(run / "final", str(data), "test", np.array([0, 1, 1, 0]), names, "fp32")["why"] is None
    assert _against_run(run / "final", str(data), "validation", np.array([0, 1, 1, 0]), names, "fp32") is None
    assert _against_run(run / "final", str(tmp_path), "test", np.array([0, 1, 1, 0]), names, "fp32") is None
    assert _against_run(run / "final", str(data), "test", np.array([0, 1, 1]), names, "fp32") is None
