"""Shared by the throughput runners: the sentiment recipe's data and hyperparameters, tokenized once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "configs" / "sentiment_minilm_polarity.yaml"


def model_overrides() -> list[str]:
    """BENCH_MODEL=<folder with config.json and the tokenizer>: every runner starts from random weights of that
    shape (a GPU machine has no network and the MiniLM weights are too large to carry along)."""
    folder = os.environ.get("BENCH_MODEL")
    return ["--model.name_or_path", folder, "--model.from_scratch", "true"] if folder else []


def recipe(*overrides: str):
    from llmkit.config import load_config

    return load_config(RECIPE, [*model_overrides(), *overrides])


def classifier(cfg, name: str):
    """The recipe's model with a 2-label head: its weights, or (model.from_scratch) random weights of its shape."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if cfg.model.from_scratch:
        torch.manual_seed(cfg.train.seed)
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(name, num_labels=2))
    return AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)


def tokenized_train(cfg, tokenizer, pad_to: int | None = None):
    """The polarity train split tokenized like the recipe (truncation at data.max_length); `pad_to` pads
    every row to that length (what transformers' run_glue.py does by default: pad_to_max_length, 128)."""
    from llmkit.data import sources

    labeled = sources.load_labeled(cfg.data, seed=cfg.train.seed, log=lambda m: None)
    rows = labeled.rows["train"]
    kwargs = {"padding": "max_length", "max_length": pad_to} if pad_to else {"max_length": cfg.data.max_length}
    enc = rows.map(lambda b: tokenizer(b[cfg.data.text_column], truncation=True, **kwargs), batched=True,
                   remove_columns=[cfg.data.text_column])
    return enc


def cpu() -> dict:
    """This machine's CPU: its model and the flags that decide the precision and the matmul kernels."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def median_ratio(ratios) -> tuple[float, float, float]:
    """The median of paired ratios (after / before, one per interleaved pair) and its 95% percentile bootstrap
    interval (scipy.stats.bootstrap, 2,000 resamples, seeded); the interval is NaN with fewer than two pairs."""
    import numpy as np
    from scipy import stats

    ratios = np.asarray(ratios, dtype=float)
    if len(ratios) < 2:
        return float(np.median(ratios)), float("nan"), float("nan")
    ci = stats.bootstrap((ratios,), np.median, confidence_level=0.95, n_resamples=2000, random_state=0,
                         method="percentile").confidence_interval
    return float(np.median(ratios)), float(ci.low), float(ci.high)


def report(result: dict) -> None:
    """Runners print one JSON line on rank 0; the driver reads the last one."""
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), file=sys.stdout, flush=True)
