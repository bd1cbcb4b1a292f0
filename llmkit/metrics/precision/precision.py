"""Precision (true positives over predicted positives): an `evaluate` module that ships with llmkit (loads offline)."""

from llmkit.metrics import counts  # a module, not the class: evaluate takes the first Metric class it finds


class Precision(counts.CountMetric):
    KIND = "precision"
    DESCRIPTION = "Precision (true positives over predicted positives) of integer class predictions against references."
