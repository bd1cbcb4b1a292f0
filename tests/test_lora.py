"""The LoRA adapters' dropout inside their A matrices (llmkit.model.lora.DroppedLinear): the same keep probability,
independence, expectation and gradients as nn.Dropout, seeded by torch's generator, the mask drawn again in backward
(outputs and gradients bit for bit the unfused ones); every adapter of a LoRA model gets it."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import LoraConfig
from llmkit.model import lora


def _identity(p: float) -> lora.DroppedLinear:
    """A DroppedLinear of one input and one output, weight 1: its output is the dropped-out input itself."""
    linear = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    return lora.DroppedLinear(linear, p).train()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_kept_independently_with_the_dropout_probability(p):
    drop = _identity(p)
    assert abs(drop.cut / 32768 - p) <= 2 ** -16
    torch.manual_seed(0)
    x = torch.ones(2_000_003, 1)  # not a multiple of 4: the last 64-bit draw is cut
    with torch.no_grad():
        out = drop(x)[:, 0]
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
    x = torch.randn(4, 33, 1)
    assert torch.equal(_identity(0.3).eval()(x), x)
    assert torch.equal(_identity(0.0)(x), x)
    drop = _identity(0.3)
    torch.manual_seed(7)
    first = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first)
    assert not torch.equal(drop(x), first)


def _unfused(x, weight, drop: lora.DroppedLinear, dtype=None):
    """peft's order by autograd: the mask drawn as DroppedLinear draws it, the dropped copy, the linear."""
    keep = lora._keep(x.shape, drop.cut, x.device)
    dropped = torch.where(keep, x * drop.scale, 0)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return torch.nn.functional.linear(dropped, weight)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_the_output_and_gradients_are_the_unfused_ones_bit_for_bit(dtype):
    """The same mask drawn again in backward: output, input gradient and A's gradient equal to autograd's over
    the dropped copy, in fp32 and under autocast (a 3-d input, as a layer's)."""
    drop = lora.DroppedLinear(torch.nn.Linear(24, 6, bias=False), 0.3).train()
    x = torch.randn(3, 5, 24)
    results = []
    for fused in (True, False):
        xi, w = x.clone().requires_grad_(), drop.weight.detach().clone().requires_grad_()
        torch.manual_seed(11)
        if fused:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = lora._DroppedProjection.apply(xi, w, drop.cut, drop.scale)
        else:
            out = _unfused(xi, w, drop, dtype)
        torch.manual_seed(99)  # backward draws from the saved state, not the generator's state now
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad, w.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert results[0][1].dtype == x.dtype and results[0][2].dtype == torch.float32


def test_an_adapter_learns_the_same_in_expectation_as_with_nn_dropout():
    """One LoRA linear, fixed input: the mean gradient of its A over many draws is the same with DroppedLinear as
    with peft's nn.Dropout before the linear, within the draws' standard error."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    a, b = torch.randn(4, 16), torch.randn(3, 4)
    grads = {}
    for name in ("nn", "fused"):
        draws = []
        for _ in range(3000):
            w = a.clone().requires_grad_()
            if name == "nn":
                out = torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.1, True), w)
            else:
                out = lora._DroppedProjection.apply(x, w, round(0.1 * 32768), 32768 / (32768 - round(0.1 * 32768)))
            (out @ b.T).square().sum().backward()
            draws.append(w.grad)
        stack = torch.stack(draws)
        grads[name] = (stack.mean(0), stack.std(0) / math.sqrt(len(draws)))
    (m1, se1), (m2, se2) = grads["nn"], grads["fused"]
    z = (m1 - m2).abs() / torch.sqrt(se1 ** 2 + se2 ** 2)
    assert z.max() < 5, z.max()


def test_every_adapter_of_a_lora_model_takes_its_dropout_inside():
    """Each adapted linear's A is a DroppedLinear and its dropout slot an Identity (with dropout), the names of
    the parameters peft saves unchanged; without dropout peft's own modules stay. The adapters on one input (q, k,
    v) keep that input once for backward, not a copy each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    names = {}
    for p, kind in ((0.05, lora.DroppedLinear), (0.0, torch.nn.Linear)):
        torch.manual_seed(0)
        net = lora.apply_lora(LlamaForCausalLM(config), LoraConfig(enabled=True, r=4, alpha=8, dropout=p),
                              "CAUSAL_LM")
        layers = [m for m in net.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]
        assert len(layers) == 2 * 7 and all(type(m.lora_A["default"]) is kind for m in layers), p
        assert all(type(m.lora_dropout["default"]) is torch.nn.Identity for m in layers), p
        names[p] = [n for n, _ in net.named_parameters()]
    assert names[0.05] == names[0.0]
    net = lora.apply_lora(LlamaForCausalLM(config), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.05),
                          "CAUSAL_LM").train()
    q, k = net.base_model.model.model.layers[0].self_attn.q_proj, net.base_model.model.model.layers[0].self_attn.k_proj
    x = torch.randn(2, 6, 32, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        q(x) + k(x).sum()
    assert sum(t is x for t in kept) == 2 and not any(t.shape == x.shape and t is not x for t in kept)
    ids = torch.randint(0, 64, (2, 6))
    net(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "lora_A" in n)


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


def test_under_gradient_checkpointing_the_recomputed_masks_are_the_same():
    """A checkpointed layer runs its forward again in backward (the generator's state restored by torch's
    checkpoint) and each adapter draws its mask again from the state it saved: every adapter's gradient is bit for
    bit the one without checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = lora.apply_lora(LlamaForCausalLM(config), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.2),
                              "CAUSAL_LM")
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: no gradient would reach A
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net.enable_input_require_grads()
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(5)
        net.train()(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert len(grads[0]) == 2 * 7 * 2 and grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
