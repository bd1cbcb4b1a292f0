"""The chunked causal-LM loss (llmkit.model.lm_head, issue 50): the same loss and gradients as transformers' own loss over
the full logits, for every loss variant (a masked prompt, packed text, rows packed padding-free, label words, class
weights), full or LoRA, tied or untied embeddings, with chunks that do and do not divide the targets; no tensor of
tokens x vocab is made; evaluation scores the same; a model whose logits change after the head keeps the full
path. In process, fp32 (the 2-rank ZeRO-2/3 runs: tests/test_recipe_causal_lm.py)."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmkit.data.lm import CLASS_KEY, IGNORE, NOT_MODEL_INPUTS, FlatCollator
from llmkit.errors import LlmkitError
from llmkit.exported import scoring
from llmkit.model import lm_head
from llmkit.train import dynamics, losses

VOCAB, HIDDEN = 96, 16  # unequal, so a tensor as wide as the vocabulary is told from one as wide as the hidden size


def _model(tied: bool = False, lora: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    net = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        for name, p in net.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: no gradient would reach A
                torch.nn.init.normal_(p, std=0.1)
    return net.train()


def _batches() -> dict[str, dict]:
    """One batch of each loss variant the recipe trains (random ids, the data modules' masking)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 23), generator=g)
    sft = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for row, (prompt, end) in enumerate(((9, 23), (5, 17), (12, 20))):  # a masked prompt, then right padding
        sft["labels"][row, :prompt] = IGNORE
        sft["labels"][row, end:] = IGNORE
        sft["attention_mask"][row, end:] = 0
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}  # packed blocks
    rows = [{"input_ids": ids[r, :n].tolist(), "labels": [IGNORE] * 4 + ids[r, 4:n].tolist()}
            for r, n in enumerate((11, 19, 7))]
    flat = FlatCollator(flash=False)(rows)  # padding-free: position_ids restart at each row
    words = {**sft, "labels": torch.full_like(ids, IGNORE), CLASS_KEY: torch.tensor([1, 0, 1])}
    for row, end in enumerate((23, 17, 20)):  # the answer: a label word and the end token
        words["labels"][row, end - 2:end] = ids[row, end - 2:end]
    return {"sft": sft, "text": text, "flat": flat, "label words": words}


def _grads(net) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return out


def _plain(net, batch: dict, weights: list[float] | None):
    out = net(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
    return losses.TokenLoss(weights)(out, batch) if weights else out.loss


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("variant", ["sft", "text", "flat", "label words", "weighted label words"])
def test_the_chunked_loss_and_its_gradients_are_the_full_logits_ones(variant, lora, tied):
    """Every parameter's gradient (the LoRA adapters, a tied embedding) as transformers' loss gives it, chunks of
    1 position, of 7 (dividing no target count here), of exactly the targets and of more (one chunk)."""
    net = _model(tied, lora)
    batch = _batches()[variant.replace("weighted ", "")]
    weights = [1.0, 3.0] if variant.startswith("weighted") else None
    table = None if weights is None else torch.tensor(weights)
    want = _plain(net, batch, weights)
    want.backward()
    expected = _grads(net)
    assert expected and (not lora or all("lora_" in n for n in expected))
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    for chunk in (1, 7, targets, 1024):
        got = lm_head.causal_lm_loss(net, {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS},
                                     batch.get(CLASS_KEY), table, chunk=chunk).loss
        got.backward()
        grads = _grads(net)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6), chunk
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=f"{name}, chunk {chunk}")


class _Widest(TorchDispatchMode):
    """The most rows of any tensor as wide as the vocabulary that an op makes (logits, their softmax, their
    gradient; not the head's weight seen transposed)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB and t.shape != (HIDDEN, VOCAB):
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def test_no_tensor_of_tokens_by_vocab_is_made():
    """Forward and backward of the chunked loss hold at most a chunk of positions x vocab (the model's own logits:
    one position a row); the full path makes all of them."""
    net, batch = _model(), _batches()["text"]
    tokens = batch["input_ids"].numel()
    with _Widest() as full:
        _plain(net, batch, None).backward()
    assert full.rows == tokens
    with _Widest() as chunked:
        lm_head.causal_lm_loss(net, batch, chunk=8).loss.backward()
    assert chunked.rows == 8 < tokens
    seen = []  # the model's own head call keeps one position a row
    hook = lm_head.head_of(net).register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    lm_head.causal_lm_loss(net, batch, chunk=8)
    hook.remove()
    assert seen == [(3, 1, VOCAB)]


# run in a fresh interpreter: glibc reads MALLOC_MMAP_THRESHOLD_ at start (every tensor over 64 KiB its own mapping,
# returned when freed, so the resident set's high-water mark is the peak of live tensors: bench/logits_terms.py)
_PEAKS = """
import json, sys, torch
sys.path.insert(0, "bench")
from logits_terms import PeakResident
from transformers import LlamaConfig, LlamaForCausalLM
from llmkit.model import lm_head
vocab, hidden, chunk = map(int, sys.argv[1:])
torch.manual_seed(0)
net = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).train()
net.get_input_embeddings().weight.requires_grad_(False)  # its dense gradient would hide the head's terms
ids = torch.randint(0, vocab, (4, 128))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
def base():  # the activations and the head weight's gradient: what every path holds
    out, last = lm_head.forward_hidden(net, batch, ids[:, 1:])
    (last.sum() + out.logits.float().sum()).backward()
paths = {"base": base, "full": lambda: net(**batch).loss.backward(),
         "chunked": lambda: lm_head.causal_lm_loss(net, batch, chunk=chunk).loss.backward()}
peaks = {}
for warm in (True, False):
    for name, step in paths.items():
        with PeakResident() as live:
            step()
        net.zero_grad(set_to_none=True)
        peaks[name] = live.peak
print(json.dumps(peaks))
"""


@pytest.mark.slow  # a fresh interpreter, ~6 s
def test_the_loss_holds_one_chunk_of_logits_beyond_the_model():
    """Measured from outside the allocator, text with the head training (every position a target): forward and
    backward of the chunked loss hold one chunk of fp32 logits beyond what the model's own pass holds; no second
    tensor of the chunk's size (torch.logsumexp's exp), no temporary as large as the head's weight (a chunk's
    weight gradient before it is summed, the model's own logits' zero gradient). The full logits: several times
    all of them."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    vocab, hidden, chunk = 16384, 128, 64  # a chunk's logits 4 MiB, the head's weight 8 MiB, all logits 32 MiB
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _PEAKS, str(vocab), str(hidden), str(chunk)], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.splitlines()[-1])
    logits = 4 * vocab * 4 * 127  # fp32
    assert peaks["full"] - peaks["base"] > 2 * logits  # the measure sees the logits
    assert peaks["chunked"] - peaks["base"] <= 1.25 * 4 * vocab * chunk, peaks


def test_evaluation_scores_the_same_without_the_full_logits():
    """Per-row log-likelihood sums and counts (loss / perplexity, label-word scores) as the full logits give them,
    chunked or not; the label-word scorer makes no logits for a word's last position."""
    net = _model().eval()
    for batch in (_batches()["sft"], _batches()["label words"]):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "targets": batch["labels"]}
        with _Widest() as full:
            want = scoring.token_logprobs(net, inputs, chunk=0)
        with _Widest() as chunked:
            got = scoring.token_logprobs(net, inputs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1])
        assert chunked.rows < full.rows == batch["input_ids"].numel()


def test_the_recorded_training_dynamics_read_the_same_scores():
    """The label-word dynamics (train.dynamics) score the answer's position: the chunked path keeps the model's
    logits exactly there."""
    net, batch = _model(), _batches()["label words"]
    score = dynamics.label_word_scores([10, 11])
    with torch.no_grad():
        want = score(net(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}), batch)
        got = score(lm_head.causal_lm_loss(net, batch, batch[CLASS_KEY]), batch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _run(chunk: int = lm_head.CHUNK) -> SimpleNamespace:
    cfg = SimpleNamespace(train=SimpleNamespace(loss_chunk=chunk))
    said = []
    return SimpleNamespace(cfg=cfg, log=said.append, said=said, precision="fp32",
                           accelerator=SimpleNamespace(autocast=nullcontext))


def test_the_loop_gets_the_chunked_step_where_it_is_exact():
    """On by default (a log line says so) and the loop's forward gives the model's own loss; train.loss_chunk 0,
    a LoRA-adapted head or logits soft-capped after the head keep the full logits and the loss_fn; a model
    that changes its logits some other way is caught at the first step."""
    net, batch = _model(), _batches()["label words"]
    run, weighted = _run(), losses.TokenLoss([1.0, 3.0])
    step = losses.causal_lm_step(run, net, weighted)
    assert step["loss_fn"] is None and "loss: chunked" in run.said[0]
    with torch.no_grad():
        assert float(step["forward"](net, batch).loss) == pytest.approx(float(_plain(net, batch, [1.0, 3.0])))
    off = _run(chunk=0)
    assert losses.causal_lm_step(off, net, weighted) == {"forward": None, "loss_fn": weighted}
    assert "train.loss_chunk is 0" in off.said[0]

    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    head = get_peft_model(_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain linear layer" in lm_head.inexact(head)
    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, final_logit_softcapping=30.0))
    assert "final_logit_softcapping" in lm_head.inexact(capped)
    assert losses.causal_lm_step(_run(), capped, None)["forward"] is None

    class Scaled(type(net)):  # a forward that scales its logits under no config key llmkit knows
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out["logits"] = out.logits * 2
            return out

    scaled = Scaled(net.config)
    forward = losses.causal_lm_step(_run(), scaled, None)["forward"]
    with pytest.raises(LlmkitError, match="does not reproduce this model's logits.*train.loss_chunk: 0"):
        forward(scaled, batch)


@pytest.mark.parametrize("dtype, loss_scale", [(torch.bfloat16, 1.0), (torch.float16, 2.0 ** 16)],
                         ids=["bf16", "fp16 scaled"])
def test_in_half_precision_the_same_within_its_rounding(dtype, loss_scale):
    """bf16 or fp16 weights (as DeepSpeed casts them; fp16's loss scaled as its loss scaler does, so the gradient
    is made in forward at the logits' scale and the loss's scale applied after): the loss within the dtype's
    rounding of the logits, every gradient within a few of its units of the largest entry (the head's weight
    gradient is summed chunk by chunk), none lost to fp16's range."""
    net, batch = _model().to(dtype), _batches()["sft"]
    want = _plain(net, batch, None)
    (want * loss_scale).backward()
    expected = _grads(net)
    got = lm_head.causal_lm_loss(net, batch, chunk=7).loss
    (got * loss_scale).backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=4e-3)
    for name, g in _grads(net).items():
        assert torch.isfinite(g).all(), name
        scale = float(expected[name].float().abs().max())
        assert scale > 0 and float((g.float() - expected[name].float()).abs().max()) <= 2 ** -6 * scale, name


def test_under_autocast_the_head_projects_in_its_dtype():
    """Mixed precision without DeepSpeed (fp32 weights, torch autocast around the step): the chunks are projected
    in bf16 as autocast runs the head's linear, so the loss is the full path's to its rounding, not fp32's."""
    net, batch = _model(), _batches()["text"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = float(_plain(net, batch, None))
        got = float(lm_head.causal_lm_loss(net, batch, chunk=7).loss.detach())
    exact = float(lm_head.causal_lm_loss(net, batch, chunk=7).loss.detach())
    assert got == pytest.approx(want, rel=1e-5) and abs(got - exact) > 1e-5
