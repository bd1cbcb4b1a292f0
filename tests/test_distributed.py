"""Real 2-rank `accelerate launch` runs with DeepSpeed on CPU: train, export, reload, metric equality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ZERO_RUN_ROWS, ZERO_RUN_STEPS
from helpers import check_ok, launch, write_config
from safetensors.torch import load_file
from sklearn import metrics as sk
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow


def _predict(folder, texts):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return model(**enc).logits.argmax(-1).tolist(), model.config.id2label


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2_accumulate"])
def test_zero_run_exports_a_model_plain_transformers_reloads(zero_runs, tiny_bert_no_dropout, name):
    run = zero_runs[name]
    out, batch, accumulation = run["dir"], run["batch"], run["accumulation"]
    stage = int(name[4])
    assert f"2 process(es), cpu, precision fp32 (set in the config), DeepSpeed ZeRO-{stage}" in run["log"]

    final = out / "final"
    for file in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "training_config.yaml"):
        assert (final / file).is_file(), file
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == batch * 2 * accumulation and ds["train_micro_batch_size_per_gpu"] == batch
    assert ds["gradient_accumulation_steps"] == accumulation

    # full weights (ZeRO-3 gathered), changed by training
    trained, initial = load_file(final / "model.safetensors"), load_file(tiny_bert_no_dropout / "model.safetensors")
    assert all(t.numel() > 0 for t in trained.values())
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert trained[key].shape == initial[key].shape and not torch.equal(trained[key], initial[key])

    # plain transformers reproduces the run's own test predictions
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 29 and [r["row"] for r in rows] == list(range(29))
    preds, id2label = _predict(final, [r["text"] for r in rows])
    assert id2label == {0: "neg", 1: "pos"}
    assert [id2label[p] for p in preds] == [r["prediction"] for r in rows]

    metrics = json.loads((out / "metrics.json").read_text())
    gold = [r["label"] for r in rows]
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean([g == id2label[p] for g, p in zip(gold, preds)]))
    assert metrics["export_check"]["same_predictions"] == metrics["export_check"]["rows"]
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["zero_stage"] == stage
    # 2 epochs of 80 rows / (batch x 2 ranks) batches per rank, one optimizer step per `accumulation` of them
    assert metrics["train"]["steps"] == 2 * (ZERO_RUN_ROWS // (batch * 2)) // accumulation == ZERO_RUN_STEPS
    # explanations come from a fresh process after the export (the ZeRO-3 run asks for them; the others do not)
    explained = out / "explanations.json"
    assert explained.is_file() == (name == "zero3")
    if name == "zero3":
        assert len(json.loads(explained.read_text())["rows"]) == 8


def test_metrics_identical_on_one_and_two_ranks_with_uneven_eval(tmp_path, tiny_bert, tiny_data):
    results = {}
    for n in (1, 2):
        cfg = write_config(tmp_path / f"c{n}.yaml", tiny_bert, tiny_data, tmp_path / f"out{n}")
        proc = launch("tests/scripts/eval_only.py", [str(cfg), str(tmp_path / f"m{n}.json")], num_processes=n)
        check_ok(proc)
        results[n] = json.loads((tmp_path / f"m{n}.json").read_text())
    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # 37 rows in batches of 4 over 2 ranks: the last round is padded by Accelerate and must be dropped again
    for r in (one, two):
        assert sorted(r["row"]) == list(range(37))
    by_row = [dict(zip(r["row"], zip(r["pred"], r["labels"]))) for r in (one, two)]
    assert by_row[0] == by_row[1]
    for key in ("accuracy", "f1", "precision", "recall", "f1_macro", "samples"):
        assert one["metrics"][key] == two["metrics"][key], key
    assert one["metrics"]["loss"] == pytest.approx(two["metrics"]["loss"], rel=1e-5)
    assert one["metrics"]["accuracy"] == pytest.approx(sk.accuracy_score(one["labels"], one["pred"]))
    assert one["metrics"]["f1"] == pytest.approx(sk.f1_score(one["labels"], one["pred"]))
