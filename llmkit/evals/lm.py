"""Causal-LM evaluation: loss / perplexity, label words scored by log-likelihood, sample generations."""

from __future__ import annotations

import json

import numpy as np
import torch

from llmkit.evals.gather import gather_split
from llmkit.exported.scoring import token_logprobs
from llmkit.launch import trackers
from llmkit.metrics import classification_metrics, perplexity
from llmkit.model import generate


def score_text(run, model, loader) -> dict[str, float]:
    """Token-level loss and perplexity over a split, exact across ranks (per-row sums gathered without duplicates)."""
    def score(batch: dict) -> dict:
        logp, count = token_logprobs(model, {**batch, "targets": batch["labels"]}, run.cfg.train.loss_chunk)
        return {"logp": logp, "count": count}

    out = gather_split(run.accelerator, model, loader, score)
    total, tokens = -torch.from_numpy(out["logp"]).sum().item(), torch.from_numpy(out["count"]).sum().item()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens)}


def score_labels(run, model, loader, num_labels: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Generative classification: each row's prediction is the label word with the highest log-likelihood of
    its response tokens; no text is generated or parsed. Accuracy / F1 go through the same `evaluate`
    modules as the classifier's. Loss and perplexity are those of the gold responses (the training target).

    Returns the metrics and, per row, the label-word log-likelihoods as "logits" (softmax = the probability
    among the label words), "labels" and "row", in the classifier's prediction-file format."""
    def score(batch: dict) -> dict:
        logp, count = token_logprobs(model, batch, run.cfg.train.loss_chunk)
        scores, count = logp.view(-1, num_labels), count.view(-1, num_labels)
        gold = batch["labels"]
        picked = torch.arange(len(gold), device=gold.device)
        return {"logits": scores, "labels": gold, "row": batch["row"], "gold_logp": scores[picked, gold],
                "gold_tokens": count[picked, gold]}

    out = gather_split(run.accelerator, model, loader, score, desc="score labels")
    metrics = classification_metrics(out["logits"].argmax(-1).tolist(), out["labels"].tolist(), num_labels)
    loss = float(-out["gold_logp"].sum() / max(out["gold_tokens"].sum(), 1))
    metrics.update(loss=loss, perplexity=perplexity(loss), samples=int(len(out["labels"])))
    out["loss"] = -out["gold_logp"] / np.maximum(out["gold_tokens"], 1)
    return metrics, out


def log_samples(run, model, tokenizer, step: int) -> None:
    """Greedy completions of train.sample_prompts: to the log, the trackers that keep text and samples.jsonl.
    Every rank calls it (a ZeRO-3 forward is collective)."""
    t, acc = run.cfg.train, run.accelerator
    if not t.sample_prompts:
        return
    stage3 = run.zero_stage == 3
    with acc.autocast():  # as training computes (generate calls the inner model, outside the prepared forward)
        texts = generate.complete(acc.unwrap_model(model), tokenizer, t.sample_prompts, t.sample_max_new_tokens,
                                  synced=stage3 and acc.num_processes > 1)
    if not acc.is_main_process:
        return
    for i, (prompt, text) in enumerate(zip(t.sample_prompts, texts)):
        run.log(f"sample {i} @ step {step}: {prompt!r} -> {text!r}")
        trackers.log_text(acc, f"samples/{i}", f"**prompt:** {prompt}\n\n**completion:** {text}", step)
    with open(run.dir.samples, "a") as fh:
        fh.write(json.dumps({"step": step, "samples": [{"prompt": p, "completion": c}
                                                        for p, c in zip(t.sample_prompts, texts)]}) + "\n")
