"""Recall (true positives over actual positives): an `evaluate` module that ships with llmkit (loads offline)."""

from llmkit.metrics import counts  # a module, not the class: evaluate takes the first Metric class it finds


class Recall(counts.CountMetric):
    KIND = "recall"
    DESCRIPTION = "Recall (true positives over actual positives) of integer class predictions against references."
