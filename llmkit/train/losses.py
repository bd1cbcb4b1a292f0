"""Class-weighted losses (train.class_weights): imbalanced labels, a common sentiment case (90% positive), weigh
each row's loss by its class: cross-entropy of a classifier's logits, or the label-word tokens of a causal LM."""

from __future__ import annotations

import torch

from llmkit.data.label_balance import class_weights
from llmkit.data.lm import CLASS_KEY, IGNORE, NOT_MODEL_INPUTS
from llmkit.errors import LlmkitError
from llmkit.model import lm_head


def weighted_cross_entropy(weights: list[float]):
    """The loop's loss_fn for a classifier: cross-entropy of the logits with each row weighted by its class
    (torch's weighted mean: sum of w[y] * loss over sum of w[y])."""
    table = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, batch) -> torch.Tensor:
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=table.to(logits.device))

    return loss


class TokenLoss:
    """The loop's loss_fn for label-word classification: the causal LM's next-token loss on the trained tokens,
    each token weighted by its row's class (sum of w * nll over sum of w; all weights 1 is the model's own loss).
    `table` (per class) is what the chunked path (causal_lm_step) weighs the same tokens by."""

    def __init__(self, weights: list[float]):
        self.table = torch.tensor(weights, dtype=torch.float32)

    def __call__(self, outputs, batch) -> torch.Tensor:
        logits = outputs.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                                reduction="none")
        w = self.table.to(logits.device)[batch[CLASS_KEY]][:, None] * (targets != IGNORE)
        return (nll * w).sum() / w.sum()


def causal_lm_step(run, net, loss_fn: TokenLoss | None) -> dict:
    """The loop's `forward` and `loss_fn` for a causal LM: the chunked loss (llmkit.model.lm_head: no tokens x vocab
    logits), class-weighted like `loss_fn`, where train.loss_chunk is not 0 and it is exact for this model; else
    the model's own full logits and `loss_fn` (a log line says which)."""
    chunk = run.cfg.train.loss_chunk
    why = "train.loss_chunk is 0" if not chunk else lm_head.inexact(net)
    if why:
        run.log(f"loss: over the full logits ({why})")
        return {"forward": None, "loss_fn": loss_fn}
    run.log(f"loss: chunked, {chunk} scored positions at a time projected onto the vocabulary (train.loss_chunk)")
    acc, table, checked = run.accelerator, None if loss_fn is None else loss_fn.table, []
    tolerance = 1e-2 if run.precision in ("bf16", "fp16") else 1e-4  # rounding of the logits' dtype

    def forward(model, batch: dict):
        with acc.autocast():  # as the prepared model's forward runs (mixed precision without DeepSpeed)
            out = lm_head.causal_lm_loss(model, {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS},
                                         batch.get(CLASS_KEY), table, chunk)
            if not checked:  # once, on every rank alike: the head's projection is the model's own logits
                checked.append(gap := lm_head.head_mismatch(model, out))
                if gap > tolerance:
                    raise LlmkitError(f"the chunked loss does not reproduce this model's logits (off by {gap:.2g} "
                                      "of their scale: its forward changes them after the head); set "
                                      "train.loss_chunk: 0")
        return out

    return {"forward": forward, "loss_fn": None}


def for_run(log, setting, train_labels: list[int], label_names: list[str], tokens: bool = False):
    """(the loop's loss_fn or None, what goes into the run summary) for train.class_weights; `tokens`: the
    label-word tokens of a causal LM rather than a classifier's logits."""
    weights = class_weights(setting, train_labels, label_names)
    if not weights:
        return None, {}
    log("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(label_names, weights)))
    loss_fn = TokenLoss(weights) if tokens else weighted_cross_entropy(weights)
    return loss_fn, {"class_weights": dict(zip(label_names, weights))}
