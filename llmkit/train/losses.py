"""Class-weighted cross-entropy for classifiers (train.class_weights): imbalanced labels, a common sentiment case
(90% positive), weigh each row's loss by its class."""

from __future__ import annotations

from collections import Counter

import torch

from llmkit.errors import LlmkitError


def class_weights(setting, train_labels: list[int], label_names: list[str]) -> list[float] | None:
    """The weight of each class, in label order: None (off), "balanced" (n / (classes x count), sklearn's rule),
    or the config's list, checked against the labels."""
    if setting is None:
        return None
    k = len(label_names)
    if setting == "balanced":
        counts = Counter(train_labels)
        missing = [label_names[i] for i in range(k) if not counts[i]]
        if missing:
            raise LlmkitError(f"train.class_weights balanced: the train split has no row of {missing}; give the "
                              "weights as a list, or fix the data")
        return [len(train_labels) / (k * counts[i]) for i in range(k)]
    if len(setting) != k:
        raise LlmkitError(f"train.class_weights lists {len(setting)} weights but the data has {k} labels "
                          f"{label_names}; give one weight per label, in that order")
    return [float(w) for w in setting]


def weighted_cross_entropy(weights: list[float]):
    """The loop's loss_fn: cross-entropy of the logits with each row weighted by its class (torch's weighted mean:
    sum of w[y] * loss over sum of w[y])."""
    table = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, batch) -> torch.Tensor:
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=table.to(logits.device))

    return loss
