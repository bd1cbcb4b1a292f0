"""The LoRA adapters' cheaper dropout (llmkit.model.lora.MaskDropout): the same keep probability, independence,
expectation and gradients as nn.Dropout, seeded by torch's generator; every adapter of a LoRA model gets it."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import LoraConfig
from llmkit.model import lora


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_kept_independently_with_the_dropout_probability(p):
    drop = lora.MaskDropout(p).train()
    assert abs(drop.cut / 32768 - p) <= 2 ** -16
    torch.manual_seed(0)
    x = torch.ones(2_000_003)  # not a multiple of 4: the last 64-bit draw is cut
    out = drop(x)
    kept = out != 0
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), drop.scale))
    keep = 1 - drop.cut / 32768
    sigma = math.sqrt(keep * (1 - keep) / x.numel())
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    fields = kept[: x.numel() // 4 * 4].view(-1, 4).float()  # the four 16-bit fields of one draw
    for field in range(4):  # the last field's sign bit is always 0: the low 15 bits alone decide
        assert abs(fields[:, field].mean().item() - keep) < 5 * sigma * 2
    both = (fields[:, 0] * fields[:, 1]).mean().item()  # two fields of one draw are independent
    assert abs(both - keep * keep) < 5 * math.sqrt(keep * keep * (1 - keep * keep) / len(fields))
    assert abs(out.mean().item() - 1.0) < 5 * sigma * drop.scale  # the expectation is the input


def test_off_outside_training_and_at_zero_and_seeded_by_torch():
    x = torch.randn(4, 33)
    assert lora.MaskDropout(0.3).eval()(x) is x
    assert lora.MaskDropout(0.0).train()(x) is x
    drop = lora.MaskDropout(0.3).train()
    torch.manual_seed(7)
    first = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first)
    assert not torch.equal(drop(x), first)
    assert drop(x.bfloat16()).dtype == torch.bfloat16


def test_an_adapter_learns_the_same_in_expectation_as_with_nn_dropout():
    """One LoRA linear, fixed input: the mean gradient of its A over many draws is the same with MaskDropout as
    with peft's nn.Dropout, within the draws' standard error (and the gradient is the mask times the scale)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    a, b = torch.randn(4, 16), torch.randn(3, 4)
    grads = {}
    for name, drop in (("nn", torch.nn.Dropout(0.1)), ("mask", lora.MaskDropout(0.1))):
        drop.train()
        draws = []
        for _ in range(3000):
            w = a.clone().requires_grad_()
            ((drop(x) @ w.T) @ b.T).square().sum().backward()
            draws.append(w.grad)
        stack = torch.stack(draws)
        grads[name] = (stack.mean(0), stack.std(0) / math.sqrt(len(draws)))
    (m1, se1), (m2, se2) = grads["nn"], grads["mask"]
    z = (m1 - m2).abs() / torch.sqrt(se1 ** 2 + se2 ** 2)
    assert z.max() < 5, z.max()
    x.requires_grad_()
    drop = lora.MaskDropout(0.25).train()
    out = drop(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * drop.scale)


def test_every_adapter_of_a_lora_model_gets_the_cheaper_mask():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    for p, kind in ((0.05, lora.MaskDropout), (0.0, torch.nn.Identity)):
        net = lora.apply_lora(LlamaForCausalLM(config), LoraConfig(enabled=True, r=4, alpha=8, dropout=p),
                              "CAUSAL_LM")
        layers = [d for m in net.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                  for d in m.lora_dropout.values()]
        assert len(layers) == 2 * 7 and all(type(d) is kind for d in layers), p
        if p:
            assert all(d.p == p for d in layers)
    net.train()
    ids = torch.randint(0, 64, (2, 6))
    net(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_frozen_linears_in_the_compute_dtype_give_the_same_outputs_and_gradients_under_autocast(task):
    """A LoRA model trained in bf16 keeps its frozen linears in bf16 (not the adapters, head, embeddings, norms or
    the output layer): under autocast its loss and every adapter gradient are bit for bit those of the fp32 base."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, num_labels=3,
                         pad_token_id=0)
    cls = LlamaForCausalLM if task == "CAUSAL_LM" else LlamaForSequenceClassification
    nets = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = lora.apply_lora(cls(config), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), task, precision)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        nets[precision] = net.train()
    dtypes = {n: p.dtype for n, p in nets["bf16"].named_parameters()}
    frozen = [n for n, p in nets["bf16"].named_parameters() if not p.requires_grad]
    assert {dtypes[n] for n in frozen if "base_layer" in n} == {torch.bfloat16}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "embed" in n or "norm" in n
               or "lm_head" in n or "score" in n), dtypes
    ids = torch.randint(1, 64, (2, 7))
    results = {}
    for precision, net in nets.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(input_ids=ids, labels=ids if task == "CAUSAL_LM" else torch.tensor([0, 2]))
        out.loss.backward()
        results[precision] = (out.loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    assert torch.equal(results["fp32"][0], results["bf16"][0])
    assert results["fp32"][1].keys() == results["bf16"][1].keys()
    for name, grad in results["fp32"][1].items():
        assert torch.equal(grad, results["bf16"][1][name]), name
    assert lora.frozen_linears_in_compute_dtype(nets["fp32"], "fp32") == 0
