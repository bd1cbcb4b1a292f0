"""F1 score (harmonic mean of precision and recall), as an `evaluate` module shipped with llmkit so it loads offline."""

import datasets
import evaluate

from llmkit.metrics._counts import score

_DESCRIPTION = "F1 score (harmonic mean of precision and recall) of integer class predictions against references."
_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    average (str): 'binary' (default, scores pos_label only), 'macro', 'micro' or 'weighted'.
    pos_label (int): the positive class for average='binary'. Default 1.
    labels (list of int): classes to include for the multiclass averages. Default: all seen.
Returns:
    f1 (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        return {"f1": score("f1", predictions, references, average=average, pos_label=pos_label, labels=labels)}
