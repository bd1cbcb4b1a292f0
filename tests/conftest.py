"""Shared fixtures: a tiny BERT and a tiny Llama made in-process, tiny sentiment data, DeepSpeed's CPU Adam op.
The helpers the tests import are in helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CHATML, LM_SPECIAL, LM_WORDS, build_tiny_bert, build_tiny_data


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
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_lm")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_SPECIAL + LM_WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(LM_SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    prompts = ["is this film good", "this film is bad", "you are helpful", "is this bad"]
    answers = ["positive", "negative", "positive", "negative"]
    for split, n in (("train", 48), ("validation", 13)):
        rows = [{"prompt": prompts[i % 4], "response": answers[i % 4]} for i in range(n)]
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
