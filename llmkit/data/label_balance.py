"""The labels' balance in the train split: every label has training rows (rare ones named in a warning), and the
weight of each class (train.class_weights) worked out from the rows."""

from __future__ import annotations

import collections

from llmkit.errors import LlmkitError

RARE = 0.01  # a label under this share of the training rows (or under 8 rows) is named in a warning


def check_balance(ids: list[int], names: list[str], log) -> None:
    """Every label has training rows: a classifier cannot learn a label it never sees (the label set may come from
    data.label_names or the dataset's features while the rows hold one class). Rare labels get a warning."""
    counts = [0] * len(names)
    for i in ids:
        counts[i] += 1
    listed = ", ".join(f"{n} {c}" for n, c in zip(names, counts))
    missing = [n for n, c in zip(names, counts) if c == 0]
    if missing:
        raise LlmkitError(f"label(s) {missing} have no training row (train split: {listed}); a classifier cannot "
                          "learn a label it never sees: add rows of it, or drop it from data.label_names")
    rare = [n for n, c in zip(names, counts) if c < max(8, RARE * len(ids))]
    if rare:
        log(f"warning: label(s) {rare} are rare in the train split ({listed}); the model may never predict them: "
            "consider train.class_weights: balanced, or more rows of them")


def class_weights(setting, train_labels: list[int], label_names: list[str]) -> list[float] | None:
    """The weight of each class, in label order: None (off), "balanced" (n / (classes x count), sklearn's rule),
    or the config's list, checked against the labels. Here with the labels, so that `llmkit validate` checks it
    before a launch (the loss, train.losses, takes the result)."""
    if setting is None:
        return None
    k = len(label_names)
    if setting == "balanced":
        counts = collections.Counter(train_labels)
        missing = [label_names[i] for i in range(k) if not counts[i]]
        if missing:
            raise LlmkitError(f"train.class_weights balanced: the train split has no row of {missing}; give the "
                              "weights as a list, or fix the data")
        return [len(train_labels) / (k * counts[i]) for i in range(k)]
    if len(setting) != k:
        raise LlmkitError(f"train.class_weights lists {len(setting)} weights but the data has {k} labels "
                          f"{label_names}; give one weight per label, in that order")
    return [float(w) for w in setting]
