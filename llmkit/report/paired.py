"""The statistics of `llmkit compare`: models scored on the same rows, set against each other row by row (paired
bootstrap, McNemar's exact test, Holm's correction over the pairs), calibrated by one temperature fitted on another
split, and cut into slices. The tests and the optimiser come from scipy, statsmodels and scikit-learn; what is
written here is their pairing, and where each has no value on the rows given (llmkit.report.undefined)."""

from __future__ import annotations

import numpy as np

from llmkit.report.undefined import defined, excludes_zero, not_defined

TOP_DISAGREEMENTS = 3  # per pair: the rows both models are most sure of while disagreeing
T_RANGE = (0.01, 100.0)  # the temperatures searched
LEVEL = 0.05  # the verdicts' family-wise error rate
MIN_ROWS = 2  # a resample of one row is that row again: an interval, or a fitted temperature, needs two


def macro_f1(gold: np.ndarray, predicted: np.ndarray, classes, axis: int = -1) -> np.ndarray:
    """Macro-F1 along `axis` over `classes` (a count or the class ids; many resamples at once: scikit-learn's
    f1_score takes one at a time, ~1 ms each, which made a comparison's intervals take minutes). A class of
    `classes` a resample neither has nor predicts scores 0, as f1_score(labels=..., zero_division=0) does; tests
    check the two agree."""
    scores = []
    for c in range(classes) if isinstance(classes, int) else classes:
        is_gold, is_pred = gold == c, predicted == c
        tp = (is_gold & is_pred).sum(axis)
        wrong = (is_gold ^ is_pred).sum(axis)  # false positives and false negatives
        scores.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
    return np.mean(scores, axis=0)


def _interval(data: tuple, statistic, resamples: int, seed: int) -> list[float] | dict:
    """A 95% paired-bootstrap percentile interval (scipy.stats.bootstrap: the rows resampled together for every
    array), or why there is none: under two rows, or every resample giving the same value (the percentile
    interval would be that one point, which looks like certainty and is only the rows' sameness)."""
    from scipy.stats import bootstrap

    rows = len(data[0])
    if rows < MIN_ROWS:
        return not_defined("too few rows for an interval", rows=rows)
    got = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    spread = np.asarray(got.bootstrap_distribution)
    if np.ptp(spread) == 0:
        return not_defined("every resample gives the same value", value=float(spread[0]), rows=rows)
    return [float(got.confidence_interval.low), float(got.confidence_interval.high)]


def mcnemar(only_a: int, only_b: int) -> float | dict:
    """McNemar's exact test: a two-sided binomial test on the rows exactly one of the models gets right. With no
    such row there is nothing to test."""
    from scipy.stats import binomtest

    if only_a + only_b == 0:
        return not_defined("no discordant row: the models are right and wrong on the same rows", discordant=0)
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def pair(gold: np.ndarray, a: np.ndarray, b: np.ndarray, classes: int, resamples: int = 2000, seed: int = 0) -> dict:
    """A against B on the same rows: accuracy and macro-F1 differences (A - B) with 95% paired-bootstrap
    percentile intervals (the same resamples for both differences), McNemar's exact test and the agreement rate.
    Each has its reason in place of a number where the rows cannot give one. The verdict (significant or not) is
    set over all the pairs together (holm)."""
    def accuracy(g, x, y, axis=-1):
        return (x == g).mean(axis) - (y == g).mean(axis)

    # over the labels these rows hold or either model predicts: a label of the model's that the rows never touch
    # would add an F1 of 0 to both, shrinking every macro-F1 towards 0 (scikit-learn's default set, too)
    present = np.union1d(np.union1d(gold, a), b).tolist()

    def f1(g, x, y, axis=-1):
        return macro_f1(g, x, present, axis) - macro_f1(g, y, present, axis)

    rows = len(gold)
    right_a, right_b = a == gold, b == gold
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    if rows == 0:
        none = not_defined("no rows", rows=0)
        return {"rows": 0, "accuracy_difference": none, "accuracy_difference_ci95": none, "f1_macro_difference": none,
                "f1_macro_difference_ci95": none, "only_a_right": 0, "only_b_right": 0, "mcnemar_exact_p": none,
                "agreement": none, "bootstrap_resamples": resamples, "seed": seed}
    return {"rows": rows, "accuracy_difference": float(accuracy(gold, a, b)),
            "accuracy_difference_ci95": _interval((gold, a, b), accuracy, resamples, seed),
            "f1_macro_difference": float(f1(gold, a, b)),
            "f1_macro_difference_ci95": _interval((gold, a, b), f1, resamples, seed),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_exact_p": mcnemar(only_a, only_b),
            "agreement": float((a == b).mean()), "bootstrap_resamples": resamples, "seed": seed}


def holm(pairs: list[dict], level: float = LEVEL) -> dict:
    """Holm's step-down correction (statsmodels) over the pairs' McNemar p-values: with k models there are
    k(k-1)/2 verdicts, and each at 5% on its own would let some "significant" through by chance. Sets each pair's
    adjusted p (`mcnemar_p_holm`), its verdict (`significant`: adjusted p < level) and, where the interval says
    otherwise, `interval_vs_test`. A pair without a test (no discordant row) or whose statistics failed is outside
    the family. Returns what the pages say about the correction."""
    from statsmodels.stats.multitest import multipletests

    tested = [p for p in pairs if "error" not in p and defined(p["mcnemar_exact_p"])]
    adjusted = multipletests([p["mcnemar_exact_p"] for p in tested], method="holm")[1] if tested else []
    for p, q in zip(tested, adjusted):
        p["mcnemar_p_holm"], p["significant"] = float(q), bool(q < level)
    for p in pairs:
        if "error" not in p:
            p.setdefault("mcnemar_p_holm", p["mcnemar_exact_p"])  # the reason there is no test
            p.setdefault("significant", False)
            if note := interval_vs_test(p, level):
                p["interval_vs_test"] = note
    return {"correction": "Holm", "family": len(tested), "level": level,
            "tested": "each pair's McNemar exact test on all the compared rows (a pair whose models are right on the "
                      "same rows has no test and is not in the family)"}


def interval_vs_test(p: dict, level: float = LEVEL) -> str | None:
    """Where the accuracy interval and the (corrected) test disagree, the sentence that says so: the verdict is
    the test's, and the interval is not evidence on its own (few discordant rows make the percentile interval
    narrow while no exact test could reach the level)."""
    excluded, q = excludes_zero(p["accuracy_difference_ci95"]), p["mcnemar_p_holm"]
    if not defined(q) or excluded == p["significant"]:
        return None
    discordant = p["only_a_right"] + p["only_b_right"]
    if excluded:
        floor = min(1.0, 2 * 0.5 ** discordant)  # the smallest two-sided p that many discordant rows can give
        return (f"the accuracy interval excludes 0 but McNemar's test does not reject (p = {q:.3g} after Holm): the "
                f"rows do not show a difference; {discordant} discordant rows"
                + (f", which can give no p below {floor:.3g}" if floor >= level else ""))
    return (f"McNemar's test rejects (p = {q:.3g} after Holm) while the accuracy interval holds 0: the verdict is "
            "the test's, the interval is too wide to add to it")


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

    rows = len(gold)
    log_probs = _log_probs(probs) if rows else np.zeros((0, 1))
    top = int((log_probs[np.arange(rows), gold] >= log_probs.max(1)).sum()) if rows else 0
    if rows < MIN_ROWS:
        return not_defined("too few rows to fit a temperature", rows=rows, right=top)
    if top == rows:  # the likelihood grows as T shrinks, without end: the optimiser would stop near its bound
        return not_defined("the model is right on every row: a smaller temperature always fits better, so none is "
                           "best", rows=rows, right=top)

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(tempered(probs, float(np.exp(log_t)))[np.arange(len(gold)), gold], 1e-12,
                                     None)).mean())

    low, high = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    if best.x - low < 1e-3:
        return not_defined(f"the best temperature lies below the searched range (T >= {T_RANGE[0]})", rows=rows,
                           right=top)
    return {"temperature": float(np.exp(best.x)), "nll_before": nll(0.0), "nll_after": float(best.fun),
            "rows": rows, "right": top,
            # at the upper end the rows are fitted best by no confidence at all (the model is no better than chance)
            "at_bound": bool(high - best.x < 1e-3)}


def length_quartiles(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks by text length in characters, one per quartile that holds rows, named by its range."""
    if len(lengths) == 0:
        return {}
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
