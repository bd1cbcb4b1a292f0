"""Losses (llmkit.train.losses): class weights by row for sequence classifiers and by token for label words,
checked by hand."""

from __future__ import annotations

import pytest
import torch

from llmkit.train import losses


def test_class_weights_weigh_each_row_by_its_class():
    labels = [0, 0, 0, 1]
    weights = losses.class_weights("balanced", labels, ["neg", "pos"])
    assert weights == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])  # n / (classes x count)
    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3], [1.0, -1.0], [0.2, 0.9]])
    target = torch.tensor(labels)
    per_row = -torch.log_softmax(logits, -1)[torch.arange(4), target]
    w = torch.tensor(weights)[target]
    by_hand = float((w * per_row).sum() / w.sum())
    loss = losses.weighted_cross_entropy(weights)(type("Out", (), {"logits": logits})(), {"labels": target})
    assert float(loss) == pytest.approx(by_hand)
    assert float(loss) != pytest.approx(float(per_row.mean()))  # the weights change it
    assert losses.class_weights([1.0, 3.0], labels, ["neg", "pos"]) == [1.0, 3.0]
    assert losses.class_weights(None, labels, ["neg", "pos"]) is None
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match="lists 3 weights but the data has 2 labels"):
        losses.class_weights([1, 2, 3], labels, ["neg", "pos"])
    with pytest.raises(LlmkitError, match="has no row of \\['pos'\\]"):
        losses.class_weights("balanced", [0, 0], ["neg", "pos"])


def test_label_word_class_weights_weigh_each_token_by_its_row(tiny_lm):
    """The label-word loss: all weights 1 is the causal LM's own loss; other weights are the by-hand weighted mean
    of the trained tokens' next-token losses."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_lm / "model").eval()
    torch.manual_seed(0)
    ids = torch.randint(3, net.config.vocab_size, (3, 7))
    labels = torch.full_like(ids, -100)
    labels[0, 4:] = ids[0, 4:]  # row 0 (class 1): 3 trained tokens; row 1 (class 0): 2; row 2 (class 1): 1
    labels[1, 5:] = ids[1, 5:]
    labels[2, 6:] = ids[2, 6:]
    batch = {"input_ids": ids, "labels": labels, "class_ids": torch.tensor([1, 0, 1])}
    with torch.no_grad():
        out = net(input_ids=ids, labels=labels)
        same = losses.TokenLoss([1.0, 1.0])(out, batch)
        weighted = losses.TokenLoss([1.0, 10.0])(out, batch)
    assert float(same) == pytest.approx(float(out.loss), rel=1e-5)
    logp = torch.log_softmax(out.logits.double(), -1)
    nll = {(r, t): -float(logp[r, t - 1, ids[r, t]]) for r in range(3) for t in range(7) if labels[r, t] >= 0}
    w = {0: 10.0, 1: 1.0, 2: 10.0}
    by_hand = sum(w[r] * v for (r, _), v in nll.items()) / sum(w[r] for r, _ in nll)
    assert float(weighted) == pytest.approx(by_hand, rel=1e-5)
    assert abs(float(weighted) - float(out.loss)) > 1e-3  # the weights change it (a random model: all near ln V)
