"""Causal-LM loading with and without LoRA on a tiny Llama made here; merged weights equal base + adapter."""

from __future__ import annotations

import pytest
import torch

from llmkit import model
from llmkit.config import LoraConfig, ModelConfig
from llmkit.errors import LlmkitError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_full_model_trains_every_weight(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig())
    assert type(net).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in net.parameters())


def test_lora_freezes_the_base_and_targets_every_projection(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True, r=4, alpha=8))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == set(model.LORA_TARGETS["llama"])
    total = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for n, p in net.named_parameters() if n in trainable) < 0.5 * total


def test_merged_model_equals_base_plus_adapter(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True, r=4, alpha=8,
                                                                                    dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter something to say
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 64, (2, 12))
    net.eval()
    with torch.no_grad():
        with_adapter = net(input_ids=ids).logits
        merged = net.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter, atol=1e-4)


def test_bad_lora_targets_are_named(tiny_llama):
    with pytest.raises(LlmkitError, match=r"lora.target_modules \['qkv'\] are not modules of this llama model"):
        model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True,
                                                                                   target_modules=["qkv"]))


def test_lora_with_gradient_checkpointing_keeps_a_gradient_path(tiny_llama):
    cfg = ModelConfig(name_or_path=str(tiny_llama), gradient_checkpointing=True)
    net = model.load_causal_lm(cfg, LoraConfig(enabled=True, r=4, alpha=8))
    net.train()
    ids = torch.randint(0, 64, (2, 10))
    net(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in net.named_parameters() if "lora_B" in n]  # A's grad is 0 while B is still 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
