"""Class-weighted losses (train.class_weights): imbalanced labels, a common sentiment case (90% positive), weigh
each row's loss by its class: cross-entropy of a classifier's logits, or the label-word tokens of a causal LM."""

from __future__ import annotations

import torch

from llmkit.data.lm import CLASS_KEY, IGNORE
from llmkit.data.sources import class_weights


def weighted_cross_entropy(weights: list[float]):
    """The loop's loss_fn for a classifier: cross-entropy of the logits with each row weighted by its class
    (torch's weighted mean: sum of w[y] * loss over sum of w[y])."""
    table = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, batch) -> torch.Tensor:
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=table.to(logits.device))

    return loss


def weighted_token_loss(weights: list[float]):
    """The loop's loss_fn for label-word classification: the causal LM's next-token loss on the trained tokens,
    each token weighted by its row's class (sum of w * nll over sum of w; all weights 1 is the model's own loss)."""
    table = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, batch) -> torch.Tensor:
        logits = outputs.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                                reduction="none")
        w = table.to(logits.device)[batch[CLASS_KEY]][:, None] * (targets != IGNORE)
        return (nll * w).sum() / w.sum()

    return loss


def for_run(log, setting, train_labels: list[int], label_names: list[str], tokens: bool = False):
    """(the loop's loss_fn or None, what goes into the run summary) for train.class_weights; `tokens`: the
    label-word tokens of a causal LM rather than a classifier's logits."""
    weights = class_weights(setting, train_labels, label_names)
    if not weights:
        return None, {}
    log("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(label_names, weights)))
    loss_fn = weighted_token_loss(weights) if tokens else weighted_cross_entropy(weights)
    return loss_fn, {"class_weights": dict(zip(label_names, weights))}
