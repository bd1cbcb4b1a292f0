"""The statistics of `llmkit compare`: models scored on the same rows, set against each other row by row (paired
bootstrap, McNemar's exact test), calibrated by one temperature fitted on another split, and cut into slices.
The tests and the optimiser come from scipy and scikit-learn; what is written here is only their pairing."""

from __future__ import annotations

import numpy as np

TOP_DISAGREEMENTS = 3  # per pair: the rows both models are most sure of while disagreeing
T_RANGE = (0.01, 100.0)  # the temperatures searched


def macro_f1(gold: np.ndarray, predicted: np.ndarray, classes: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 along `axis` (many resamples at once: scikit-learn's f1_score takes one at a time, ~1 ms each,
    which made a comparison's intervals take minutes). A class no row has nor is predicted scores 0, as
    f1_score(zero_division=0) does; tests check the two agree."""
    scores = []
    for c in range(classes):
        is_gold, is_pred = gold == c, predicted == c
        tp = (is_gold & is_pred).sum(axis)
        wrong = (is_gold ^ is_pred).sum(axis)  # false positives and false negatives
        scores.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
    return np.mean(scores, axis=0)


def pair(gold: np.ndarray, a: np.ndarray, b: np.ndarray, classes: int, resamples: int = 2000, seed: int = 0) -> dict:
    """A against B on the same rows: accuracy and macro-F1 differences (A - B) with 95% paired-bootstrap
    percentile intervals (scipy.stats.bootstrap, paired: the rows resampled together for both; the same
    resamples for both differences), McNemar's exact test (a two-sided binomial test on the rows exactly one of
    them gets right), and the agreement rate."""
    from scipy.stats import binomtest, bootstrap

    def interval(statistic) -> list[float]:
        got = bootstrap((gold, a, b), statistic, paired=True, vectorized=True, n_resamples=resamples,
                        method="percentile", random_state=np.random.default_rng(seed))
        return [float(got.confidence_interval.low), float(got.confidence_interval.high)]

    def accuracy(g, x, y, axis=-1):
        return (x == g).mean(axis) - (y == g).mean(axis)

    def f1(g, x, y, axis=-1):
        return macro_f1(g, x, classes, axis) - macro_f1(g, y, classes, axis)

    right_a, right_b = a == gold, b == gold
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"rows": len(gold), "accuracy_difference": float(accuracy(gold, a, b)),
            "accuracy_difference_ci95": interval(accuracy),
            "f1_macro_difference": float(f1(gold, a, b)), "f1_macro_difference_ci95": interval(f1),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_exact_p": float(p),
            "significant": bool(p < 0.05), "agreement": float((a == b).mean()), "bootstrap_resamples": resamples,
            "seed": seed}


def _log_probs(probs: np.ndarray) -> np.ndarray:
    # the prediction files keep probabilities to 6 decimals: a 0 there is "below 1e-6", not impossible
    return np.log(np.clip(probs, 1e-7, 1.0))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The class probabilities with the logits divided by `temperature` (log-probabilities are the logits up to
    a per-row constant, which the softmax removes)."""
    z = _log_probs(probs) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, gold: np.ndarray) -> dict:
    """Temperature scaling (Guo et al. 2017): the one T > 0 that minimises the negative log-likelihood of the gold
    labels on these rows (scipy's bounded scalar minimiser over log T). It divides every logit, so no prediction
    changes; only the confidence does."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(tempered(probs, float(np.exp(log_t)))[np.arange(len(gold)), gold], 1e-12,
                                     None)).mean())

    low, high = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return {"temperature": float(np.exp(best.x)), "nll_before": nll(0.0), "nll_after": float(best.fun),
            "rows": int(len(gold)),
            # at the upper end the rows are fitted best by no confidence at all (the model is no better than chance)
            "at_bound": bool(min(best.x - low, high - best.x) < 1e-3)}


def length_quartiles(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks by text length in characters, one per quartile that holds rows, named by its range."""
    edges = np.quantile(lengths, [0.25, 0.5, 0.75])
    which = np.searchsorted(edges, lengths, side="right")
    masks = {}
    for q in range(4):
        if (which == q).any():
            lo, hi = int(lengths[which == q].min()), int(lengths[which == q].max())
            masks[f"length Q{q + 1} ({lo}-{hi} chars)"] = which == q
    return masks


def by_value(column: str, values: list) -> dict[str, np.ndarray]:
    """Row masks by each value of a data column, in sorted order of the values."""
    text = np.array([str(v) for v in values])
    return {f"{column} = {v}": text == v for v in sorted(set(text.tolist()))}


def disagreements(a: np.ndarray, b: np.ndarray, confidence_a: np.ndarray, confidence_b: np.ndarray,
                  count: int = TOP_DISAGREEMENTS) -> list[int]:
    """The rows where A and B predict different labels, the ones where the less sure of the two is surest first:
    where both are confident and one of them must be wrong."""
    rows = np.flatnonzero(a != b)
    order = np.argsort(-np.minimum(confidence_a[rows], confidence_b[rows]), kind="stable")
    return [int(r) for r in rows[order][:count]]
