"""2-rank causal-LM runs (tiny Llama made here): full and LoRA under ZeRO-2 and ZeRO-3 train, export, reload."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import check_ok, launch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer and a ChatML template, plus prompt/response data."""
    from test_lm_data import CHATML, SPECIAL, WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_lm")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIAL)
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


@pytest.mark.parametrize(("stage", "lora"), [(2, True), (3, True), (2, False), (3, False)])
def test_causal_lm_trains_exports_and_reloads(tmp_path, tiny_lm, stage, lora):
    out = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": str(tiny_lm / "model")},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": str(tiny_lm / "data"), "test_split": None, "prompt_column": "prompt",
                 "response_column": "response", "max_length": 32},
        "train": {"epochs": 2, "per_device_batch_size": 4, "eval_batch_size": 4, "learning_rate": 5e-3,
                  "warmup_ratio": 0.0, "logging_steps": 1, "precision": "fp32"},
        "output": {"output_dir": str(out)},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch("recipes/causal_lm.py", ["--config", str(tmp_path / "c.yaml")], f"cpu_zero{stage}.yaml")
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
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
