"""The causal-LM recipe end to end on 2 ranks (tiny Llama made here): full and LoRA under ZeRO-2 and ZeRO-3
train, export, reload; label words under ZeRO-3; a from-scratch tokenizer with packing; SmolLM2 (real asset)
bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, check_numerics, check_ok, launch, write_lm_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _as_mixture(cfg_path, tiny_lm, tmp_path) -> None:
    """The run's data as a mixture: its prompt/response rows (weight 2) and the same rows in alpaca form (weight 1)."""
    rows = [json.loads(line) for line in (tiny_lm / "data" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "train.jsonl").write_text("".join(
        json.dumps({"instruction": r["prompt"], "input": "", "output": r["response"]}) + "\n" for r in rows))
    cfg = yaml.safe_load(cfg_path.read_text())
    for key in ("dataset", "prompt_column", "response_column"):
        del cfg["data"][key]
    cfg["data"]["mixture"] = [{"dataset": str(tiny_lm / "data"), "weight": 2.0},
                              {"dataset": str(tmp_path / "alpaca"), "weight": 1.0}]
    cfg_path.write_text(yaml.safe_dump(cfg))


# the third run reads a two-source mixture; the last packs its rows padding-free (data.packing): no pad token.
# The first and the last are `llmkit check-numerics` runs: every step of the chunked loss on 2 ranks (ZeRO-2 LoRA,
# ZeRO-3 full with the head trained) held against the one-process fp32 reference on the full logits (issue 50)
@pytest.mark.parametrize(("stage", "lora", "packing", "mixture", "checked"), [
    (2, True, False, False, True), (3, True, False, False, False), (2, False, False, True, False),
    (3, False, True, False, True)])
def test_causal_lm_trains_exports_and_reloads(tmp_path, tiny_lm, stage, lora, packing, mixture, checked):
    out = tmp_path / "check" / "run" if checked else tmp_path / "run"  # check-numerics runs it in <its folder>/run
    cfg = write_lm_config(tmp_path / "c.yaml", tiny_lm, out, lora, epochs=2, logging_steps=1)
    if mixture:
        _as_mixture(cfg, tiny_lm, tmp_path)
    args = ["--data.packing", str(packing).lower()]
    if checked:  # 2 epochs of 48 rows, 4 x 2 ranks a step: 12 steps; the export reloaded as a plain run does it
        proc, verdict = check_numerics(tmp_path / "check", cfg, f"cpu_zero{stage}", 12,
                                       [*args, "--output.verify_export", "true"], recipe="causal_lm")
        assert proc.returncode == 0 and verdict["passed"], (verdict or {}).get("summary", proc.stderr[-3000:])
        assert f"DeepSpeed ZeRO-{stage}" in verdict["checked"] and "12 steps" in verdict["checked"]
    else:
        proc = launch("recipes/causal_lm.py", ["--config", str(cfg), *args], f"cpu_zero{stage}.yaml")
        check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())  # every run ends with its report
    assert report["kind"] == "lm"
    assert report["runs"][0]["scores"]["validation"]["loss"] == metrics["validation"]["loss"]
    if mixture:  # what each source gave, in the log, metrics.json, the report and the card
        mix = metrics["data_mixture"]
        assert [m["weight_share"] for m in mix] == pytest.approx([2 / 3, 1 / 3])
        assert sum(m["examples"] for m in mix) == metrics["train"]["train_examples"]
        assert min(m["examples"] for m in mix) < max(m["available"] for m in mix)  # first_exhausted ended it
        assert report["runs"][0]["data_mixture"] == mix
        first = f"| {mix[0]['source']} | 2 | 66.7% | {mix[0]['examples']} | {mix[0]['available']} |"
        assert first in (out / "report.md").read_text()
        assert "Training data (mixture)" in (out / "report.html").read_text()
        from llmkit.rundir.layout import RunDir
        from llmkit.ship import card

        assert f"{mix[1]['examples']} of {mix[1]['available']}" in card.build(RunDir(out), out / "final", "causal_lm", "me/x")
        assert "mixture source" in proc.stdout + proc.stderr
    if packing:  # every processed token is a real one, and the log says how the rows went in
        assert metrics["train"]["padding_efficiency"] == 1.0
        assert "rows packed padding-free" in proc.stdout + proc.stderr
    history = metrics["train"]["history"]
    assert history[-1]["loss"] < history[0]["loss"] or metrics["validation"]["loss"] < 2.0  # it learned
    assert all(v <= 1e-4 for v in metrics["export_check"].values()), metrics["export_check"]

    from transformers import AutoModelForCausalLM

    final = out / "final"
    if lora:
        from peft import PeftModel

        adapter = load_file(final / "adapter" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())
        assert all("lora_" in k for k in adapter)
        base = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
        PeftModel.from_pretrained(base, final / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(final / "merged")
        assert (final / "merged" / "chat_template.jinja").is_file() or "chat_template" in \
            (final / "merged" / "tokenizer_config.json").read_text()
    else:
        weights = load_file(final / "model.safetensors")
        assert all(t.numel() > 0 for t in weights.values())
        merged = AutoModelForCausalLM.from_pretrained(final)
    assert type(merged).__name__ == "LlamaForCausalLM"
    _validation_loss_is_the_full_logits_one(proc, cfg, packing, merged, metrics["validation"]["loss"])


def _validation_loss_is_the_full_logits_one(proc, cfg_path, packing: bool, exported, loss: float) -> None:
    """The run trained and evaluated on the chunked loss (llmkit.model.lm_head, issue 50) on its 2 ranks; its validation
    loss is the one the exported model's full logits give here, in one process."""
    from transformers import AutoTokenizer

    from llmkit.config import load_config
    from llmkit.data import lm
    from llmkit.exported.scoring import token_logprobs

    assert "loss: chunked, 512 scored positions at a time" in proc.stdout + proc.stderr
    cfg = load_config(cfg_path, ["--data.packing", str(packing).lower()])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    rows = lm.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=lambda *_: None).validation
    collate, total, tokens = lm.LMCollator(tokenizer.pad_token_id), 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(rows), 8):
            batch = collate([rows[i] for i in range(lo, min(lo + 8, len(rows)))])
            logp, count = token_logprobs(exported.eval(), {**batch, "targets": batch["labels"]}, chunk=0)
            total, tokens = total - float(logp.sum()), tokens + float(count.sum())
    assert total / tokens == pytest.approx(loss, rel=1e-4)


def _generate(model_dir, prompt: str, *extra: str) -> str:
    import subprocess
    import sys

    from helpers import LAUNCH_ENV

    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "generate", str(model_dir), "--prompt", prompt,
                           "--max-new-tokens", "4", *extra], capture_output=True, text=True, env=LAUNCH_ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_label_words_under_zero3_score_generate_and_export(tmp_path, tiny_lm):
    """Generative classification with LoRA on 2 ranks, ZeRO-3 and class weights: label-word scores gathered exactly
    (checked against the exported model scored here), sample generations at each eval, `llmkit generate` on adapter
    and merged."""
    texts = ["this film is good", "this film is bad", "is this good", "is this bad", "you are good", "hi bad"]
    for split, n in (("train", 48), ("validation", 13), ("test", 7)):
        rows = [{"text": texts[i % 6], "label": "positive" if "good" in texts[i % 6] else "negative"}
                for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(tiny_lm / "model")},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": str(tmp_path), "prompt_template": "is this {text}", "label_names": ["negative", "positive"],
                 "max_length": 32},
        "train": {"epochs": 2, "per_device_batch_size": 4, "eval_batch_size": 3, "learning_rate": 5e-3,
                  "warmup_ratio": 0.0, "logging_steps": 1, "precision": "fp32", "eval_every_steps": 4,
                  "sample_prompts": ["is this film good", "hi"], "sample_max_new_tokens": 3,
                  "class_weights": [1.0, 2.0]},
        "output": {"output_dir": str(out), "explain_rows": 4},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch("recipes/causal_lm.py", ["--config", str(tmp_path / "c.yaml")], "cpu_zero3.yaml")
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(v <= 1e-4 for v in metrics["export_check"].values()), metrics["export_check"]
    # class weights on the label-word tokens: logged and in the summary the card reads
    assert "class weights: negative 1.000, positive 2.000" in proc.stdout + proc.stderr
    assert "loss: chunked" in proc.stdout + proc.stderr  # the class-weighted label words, under ZeRO-3 (issue 50)
    assert metrics["train"]["class_weights"] == {"negative": 1.0, "positive": 2.0}

    # the training dynamics of label words (issue 49): each of the 48 rows once an epoch, scored by the label
    # words (one token each in this vocabulary) at the answer's position of the training forward; the data map
    records = np.load(out / "training_dynamics.npy")
    assert [sorted(records[records["epoch"] == e]["row"].tolist()) for e in (0, 1)] == [list(range(48))] * 2
    assert metrics["train"]["training_dynamics"]["scores"] == "softmax over the label words, each one token"
    assert "<h3>Training data map</h3>" in (out / "report.html").read_text()

    # every eval logged its samples (steps 4, 8, 12 and the epoch ends 6, 12)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 6, 8, 12]
    assert all([x["prompt"] for x in s["samples"]] == ["is this film good", "hi"] for s in samples)

    # the predictions file: every row once, and the metrics follow from it (scikit-learn)
    from sklearn.metrics import accuracy_score, f1_score

    for split, n in (("validation", 13), ("test", 7)):
        rows = [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert [r["row"] for r in rows] == list(range(n))
        gold = [r["label"] == "positive" for r in rows]
        pred = [r["prediction"] == "positive" for r in rows]
        assert metrics[split]["accuracy"] == pytest.approx(accuracy_score(gold, pred))
        assert metrics[split]["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
        assert metrics[split]["samples"] == n

    # independent scoring of the exported merged model agrees with the run's predictions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    tok = AutoTokenizer.from_pretrained(out / "final" / "merged")
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    for r in rows:
        scores = []
        for word in ("negative", "positive"):
            msgs = [{"role": "user", "content": f"is this {r['text']}"}, {"role": "assistant", "content": word}]
            ids = tok.apply_chat_template(msgs, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            head = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)
            start = len(head["input_ids"] if hasattr(head, "keys") else head)
            with torch.no_grad():
                logp = torch.log_softmax(merged(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))))
        probs = torch.softmax(torch.tensor(scores), 0).tolist()
        assert r["prediction"] == ("positive" if scores[1] > scores[0] else "negative")
        assert r["probabilities"] == pytest.approx(probs, abs=1e-4)

    # `llmkit eval` scores the export by its label words (the run's records beside it): the run's own predictions
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "eval", str(out / "final"), "--data", str(tmp_path),
                          "--split", "test", "--output", str(tmp_path / "ev")], capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    scored = [json.loads(line) for line in (tmp_path / "ev" / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in scored] == [r["prediction"] for r in rows]
    assert sum((scored_r["probabilities"] for scored_r in scored), []) == pytest.approx(
        sum((r["probabilities"] for r in rows), []), abs=1e-4)

    # why it said that: the label words' attributions over the text's words, computed from the export in a
    # fresh process (a ZeRO-3 rank would load it partitioned), in the report too
    doc = json.loads((out / "explanations.json").read_text())
    assert len(doc["rows"]) == 4 and doc["disagree"] == 0
    by_row = {r["row"]: r for r in rows}
    for row in doc["rows"]:
        assert row["words"] == by_row[row["row"]]["text"].split()
        assert set(row["attributions"]) == {"negative", "positive"} and row["prediction"] == row["run_prediction"]
        assert row["probabilities"] == pytest.approx(by_row[row["row"]]["probabilities"], abs=1e-3)
    assert "Why the model said that" in (out / "report.html").read_text()

    # generation from the adapter (with its base) and from the merged model: the same greedy text
    from_adapter = _generate(out / "final" / "adapter", "is this film good")
    from_final = _generate(out / "final", "is this film good")
    assert from_adapter == from_final and from_final.strip()


def test_from_scratch_trains_a_bpe_tokenizer_and_packs_text(tmp_path):
    """No tokenizer given: a byte-level BPE one is trained on the train text, saved with the model, and used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    arch = tmp_path / "arch"
    LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(arch)
    assert sorted(p.name for p in arch.iterdir()) == ["config.json"]
    lines = [f"the film number {i} was {'good' if i % 3 else 'bad'} and the plot was {'long' if i % 2 else 'thin'}"
             for i in range(240)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:200]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[200:]))
    out = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(arch), "from_scratch": True},
        "data": {"dataset": str(tmp_path), "test_split": None, "max_length": 32},
        "train": {"epochs": 1, "per_device_batch_size": 4, "eval_batch_size": 8, "learning_rate": 3e-3,
                  "warmup_ratio": 0.0, "logging_steps": 2, "precision": "fp32"},
        "output": {"output_dir": str(out)},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch("recipes/causal_lm.py", ["--config", str(tmp_path / "c.yaml")], "cpu_zero2.yaml")
    check_ok(proc)
    assert "tokenizer: trained a byte-level BPE tokenizer" in proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packing_efficiency"] > 0.95
    history = metrics["train"]["history"]
    assert metrics["validation"]["loss"] < 5.0 and history  # far below ln(320) = 5.77 of a uniform guess
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert len(tok) <= 320 and tok.eos_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert tok.decode(tok("the film was good")["input_ids"]) == "the film was good"
    assert _generate(final, "the film number", "--chat", "off").strip()


def test_smollm2_lora_bounded_run_exports_and_generates(tmp_path):
    """The generative-sentiment recipe on the real SmolLM2 asset, a few steps: label scores, a merged export and
    an adapter that plain peft loads, and `llmkit generate` answering from the export."""
    out = tmp_path / "run"
    proc = launch("recipes/causal_lm.py", [
        "--config", str(ROOT / "recipes/configs/sentiment_smollm2_lora.yaml"), "--train.max_steps", "3",
        "--data.max_train_samples", "48", "--data.max_eval_samples", "8", "--output.explain_rows", "1",
        "--output.explain_max_steps", "16",
        "--train.sample_max_new_tokens", "8", "--output.output_dir", str(out)],
        "cpu_zero2.yaml", timeout=900)
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["test"]["samples"] == 8
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["validation"]["perplexity"] > 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == 3 and samples[-1]["samples"][0]["completion"]
    # a test row explained through the real chat template and tokenizer: every word of the review attributed
    explained = json.loads((out / "explanations.json").read_text())["rows"]
    assert len(explained) == 1 and all(r["words"] == r["text"].split() for r in explained)
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
