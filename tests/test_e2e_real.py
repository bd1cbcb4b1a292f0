"""A bounded run of the real default recipe (MiniLM asset, polarity split, 2 ranks, ZeRO-2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, check_ok, launch

pytestmark = pytest.mark.slow


def test_default_recipe_bounded_run_exports_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    proc = launch("recipes/classification.py", [
        "--config", str(ROOT / "recipes/configs/sentiment_minilm_polarity.yaml"),
        "--train.max_steps", "40", "--data.max_eval_samples", "256", "--train.precision", "fp32",
        "--output.output_dir", str(out)], "cpu_zero2.yaml", timeout=900)
    check_ok(proc)
    log = proc.stdout + proc.stderr
    assert "data: train 8433, validation 256, test 256 rows; labels ['negative', 'positive']" in log

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 40
    # 40 steps of 32 rows already learn something real on this data
    assert metrics["test"]["accuracy"] > 0.65, metrics["test"]
    assert metrics["train"]["padding_efficiency"] > 0.9

    # the export loads in plain transformers (a fresh interpreter, no llmkit import) and predicts what the run did
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder = {str(out / "final")!r}
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        texts = json.load(open({str(tmp_path / "texts.json")!r}))
        with torch.no_grad():
            logits = model(**tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits
        print(json.dumps([model.config.id2label[int(i)] for i in logits.argmax(-1)]))
        assert "llmkit" not in sys.modules
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    predicted = json.loads(got.stdout.strip().splitlines()[-1])
    assert predicted == [r["prediction"] for r in rows]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])


def test_smollm2_lora_bounded_run_exports_and_generates(tmp_path):
    """The generative-sentiment recipe on the real SmolLM2 asset, a few steps: label scores, a merged export and
    an adapter that plain peft loads, and `llmkit generate` answering from the export."""
    out = tmp_path / "run"
    proc = launch("recipes/causal_lm.py", [
        "--config", str(ROOT / "recipes/configs/sentiment_smollm2_lora.yaml"), "--train.max_steps", "3",
        "--data.max_train_samples", "64", "--data.max_eval_samples", "8", "--output.output_dir", str(out)],
        "cpu_zero2.yaml", timeout=900)
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["test"]["samples"] == 8
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["validation"]["perplexity"] > 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == 3 and samples[-1]["samples"][0]["completion"]
    final = out / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (final / "merged" / "model.safetensors").is_file()
    assert "<|im_start|>" in (final / "merged" / "chat_template.jinja").read_text()
    prompt = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
              "Review: a gorgeous, witty and deeply moving film.")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "generate", str(final), "--prompt", prompt,
                          "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip()  # the merged model answers (a few greedy tokens)
