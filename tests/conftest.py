"""Shared fixtures: a tiny BERT and a tiny Llama made in-process, tiny sentiment data, DeepSpeed's CPU Adam op.
The helpers the tests import are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_tiny_bert, build_tiny_data, build_tiny_lm


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a 40-word vocabulary and its fast tokenizer, saved as a model folder."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT with dropout off: runs that must compute the same numbers draw no random masks."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    config = AutoConfig.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for path in tiny_bert.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (out / path.name).write_bytes(path.read_bytes())  # the tokenizer files
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train (96 rows) / validation (37, uneven for 2 ranks) / test (29) jsonl with string labels."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def cpu_adam():
    """DeepSpeed's CPU Adam op for optimizer offload: JIT-built once per session (about a minute or more on
    2 cores the first time; cached in ~/.cache/torch_extensions afterwards)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer and a ChatML template, plus prompt/response data."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
