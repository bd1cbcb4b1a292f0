"""The causal-LM recipe end to end on 2 ranks (tiny Llama made here): full and LoRA under ZeRO-2 and ZeRO-3
train, export, reload (ZeRO-3 LoRA in test_ship_hub, whose run pushes its adapter; lm_runs.py holds the checks every
such run passes); a mixture; label words under ZeRO-3; a from-scratch tokenizer with packing; SmolLM2 (real asset)
bounded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, check_numerics, check_ok, cli, launch, write_lm_config
from lm_runs import check_causal_lm_run

pytestmark = pytest.mark.slow


# The second run packs its rows padding-free (data.packing): no pad token. Both are `llmkit check-numerics` runs:
# every step of the chunked loss on 2 ranks (ZeRO-2 LoRA, ZeRO-3 full with the head trained) held against the
# one-process fp32 reference on the full logits (issue 50). The same checks read ZeRO-2 full fine-tuning on a
# mixture (conftest.lm_mixture_run, below) and ZeRO-3 LoRA (the run that pushes its adapter, test_ship_hub).
@pytest.mark.parametrize(("stage", "lora", "packing"), [(2, True, False), (3, False, True)])
def test_causal_lm_trains_exports_and_reloads(tmp_path, tiny_lm, stage, lora, packing):
    out = tmp_path / "check" / "run"  # check-numerics runs it in <its folder>/run
    cfg = write_lm_config(tmp_path / "c.yaml", tiny_lm, out, lora, epochs=2, logging_steps=1)
    args = ["--data.packing", str(packing).lower()]
    # 2 epochs of 48 rows, 4 x 2 ranks a step: 12 steps; the export reloaded as a plain run does it
    proc, verdict = check_numerics(tmp_path / "check", cfg, f"cpu_zero{stage}", 12,
                                   [*args, "--output.verify_export", "true"], recipe="causal_lm")
    assert proc.returncode == 0 and verdict["passed"], (verdict or {}).get("summary", proc.stderr[-3000:])
    assert f"DeepSpeed ZeRO-{stage}" in verdict["checked"] and "12 steps" in verdict["checked"]
    check_causal_lm_run(proc, cfg, out, tiny_lm, lora, packing)


def test_full_fine_tuning_on_a_mixture_under_zero2(lm_mixture_run, tiny_lm):
    """The shared ZeRO-2 run on a two-source mixture (conftest.lm_mixture_run, which also reports to four trackers):
    what each source gave, in the log, metrics.json, the report and the card; the run's own checks."""
    run = lm_mixture_run
    check_causal_lm_run(run.proc, run.cfg, run.out, tiny_lm, lora=False, mixture=True)


def _generate(model_dir, prompt: str, *extra: str) -> str:
    proc = cli(["generate", model_dir, "--prompt", prompt, "--max-new-tokens", "4", *extra])
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
    got = cli(["eval", out / "final", "--data", tmp_path, "--split", "test", "--output", tmp_path / "ev"])
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
        "--train.per_device_batch_size", "2", "--data.max_train_samples", "12", "--data.max_eval_samples", "8",
        "--output.explain_rows", "1",
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
    assert _generate(final, prompt).strip()  # the merged model answers (a few greedy tokens)
