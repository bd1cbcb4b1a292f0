"""F1 score (harmonic mean of precision and recall): an `evaluate` module that ships with llmkit (loads offline)."""

from llmkit.metrics import counts  # a module, not the class: evaluate takes the first Metric class it finds


class F1(counts.CountMetric):
    KIND = "f1"
    DESCRIPTION = "F1 score (harmonic mean of precision and recall) of integer class predictions against references."
