"""The numbers of the evaluation report, computed from the files a run leaves: predictions_<split>.jsonl (text,
gold, predicted label, class probabilities), metrics.json, metrics.jsonl (logged scalars), training_config.yaml,
run_info.json and data_map.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit import compression
from llmkit.errors import LlmkitError
from llmkit.metrics import averaging, classification_metrics, is_binary
from llmkit.metrics.counts import per_class_scores
from llmkit.report import runs
from llmkit.report.undefined import not_defined
from llmkit.rundir import layout

BOOTSTRAP_SAMPLES = 1000
CALIBRATION_BINS = 10
MISTAKES_SHOWN = 10


def read_predictions(path: Path, names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Rows of a predictions file and the label names in probability order (from metrics.json, else recovered
    from the rows: each prediction is the argmax of its probabilities)."""
    rows, _ = layout.read_jsonl(path)  # a torn last line (a run killed mid-write) is skipped
    if not rows:
        raise LlmkitError(f"{path} holds no predictions")
    if names is None:
        found: list[str | None] = [None] * len(rows[0]["probabilities"])
        for r in rows:
            found[int(np.argmax(r["probabilities"]))] = r["prediction"]
        if None in found:
            raise LlmkitError(f"{path}: cannot tell which probability belongs to which label; metrics.json "
                              "next to it should list label_names")
        names = found
    known = set(names)
    for i, r in enumerate(rows):
        if r["label"] not in known or r["prediction"] not in known or len(r["probabilities"]) != len(names):
            raise LlmkitError(f"{path} line {i + 1} does not match the labels {names}")
    return rows, names


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False / true positive rates over every threshold, and the area under them (trapezoids)."""
    order = np.argsort(-score, kind="stable")
    y, score = y[order], score[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]  # last index of each score value
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    tpr, fpr = np.r_[0.0, tps / pos], np.r_[0.0, fps / neg]
    return fpr, tpr, float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision and recall over every threshold, and average precision (sum of precision x recall steps)."""
    order = np.argsort(-score, kind="stable")
    y, score = y[order], score[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]
    tps = np.cumsum(y)[distinct]
    predicted = distinct + 1
    precision = tps / predicted
    recall = tps / max(y.sum(), 1)
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return np.r_[1.0, precision], np.r_[0.0, recall], ap


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability bins of the top-class probability, and the expected calibration error (none of no rows)."""
    if len(confidence) == 0:
        return {"ece": not_defined("no rows", rows=0), "bins": []}
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                      "confidence": conf, "accuracy": acc})
    return {"ece": float(ece), "bins": table}


def bootstrap(y: np.ndarray, pred: np.ndarray, num_labels: int, samples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0) -> dict:
    """95% percentile intervals of accuracy and F1 over rows resampled with replacement (seeded), and how many
    resamples. Each is its reason instead where the rows cannot give one: under two rows (a resample of one row is
    that row), or every resample giving the same value (every row right: the interval would be the point 1.0)."""
    n = len(y)
    if n < 2:
        none = not_defined("too few rows for an interval", rows=n)
        return {"accuracy": none, "f1": none, "resamples": samples}
    rng = np.random.default_rng(seed)
    accs, f1s = np.empty(samples), np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        accs[i] = (y[idx] == pred[idx]).mean()
        f1s[i] = _f1(y[idx], pred[idx], num_labels)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if np.ptp(v) > 0 else
            not_defined("every resample gives the same value", value=float(v[0]), rows=n)
            for name, v in (("accuracy", accs), ("f1", f1s))} | {"resamples": samples}


def _f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """The headline F1 of `k` classes, as in the run's metrics: binary F1 of class 1 where llmkit.metrics calls the
    labels binary, else macro F1."""
    if is_binary(range(k)):
        return float(per_class_scores(pred, y, [1])[2][0])
    return float(per_class_scores(pred, y, np.union1d(y, pred))[2].mean())  # macro over the labels present


def per_class(y: np.ndarray, pred: np.ndarray, names: list[str]) -> list[dict]:
    """Precision, recall and F1 of each class, each its reason where it divides by nothing: precision of a class
    never predicted, recall of a class no row has, F1 of a class neither (scikit-learn would print 0.0 for each,
    which reads as a model that fails the class)."""
    precision, recall, f1 = per_class_scores(pred, y, range(len(names)))
    out = []
    for c, name in enumerate(names):
        support, predicted = int((y == c).sum()), int((pred == c).sum())
        out.append({"label": name,
                    "precision": float(precision[c]) if predicted else not_defined("never predicted", predicted=0),
                    "recall": float(recall[c]) if support else not_defined("no row of this class", support=0),
                    "f1": float(f1[c]) if support or predicted else not_defined(
                        "no row of this class and never predicted", support=0, predicted=0),
                    "support": support})
    return out


def _one_against_rest(y: np.ndarray, score: np.ndarray, label: str, name: str) -> tuple:
    """A class's ROC and precision-recall curves against the rest: (name, x, y, area) each, or the reason where a
    ranking cannot be scored (ROC needs rows in and out of the class, average precision rows in it)."""
    positives, rows = int(y.sum()), len(y)
    if positives == 0:
        why = not_defined(f"no row of {label}", rows=rows)
        return why, why
    fpr, tpr, auc = roc_curve(y, score)
    prec, rec, ap = pr_curve(y, score)
    roc = (name, fpr, tpr, auc) if positives < rows else not_defined(f"every row is {label}", rows=rows)
    return roc, (name, rec, prec, ap)


def ranking(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """ROC AUC and average precision (of class 1 for two labels, the positive class of binary F1; else the macro
    average of one-vs-rest, defined only where every class has rows in and out of it), and their curves."""
    k = len(names)
    if is_binary(names):  # the curves rank rows by the probability of class 1
        roc, pr = _one_against_rest((y == 1).astype(int), probs[:, 1], names[1], f"positive: {names[1]}")
        rocs, prs = [roc], [pr]
    else:
        rocs, prs = zip(*(_one_against_rest((y == c).astype(int), probs[:, c], names[c], names[c])
                          for c in range(k)))
    out = {"_curves": {"roc": [r for r in rocs if isinstance(r, tuple)],  # the classes that have a curve
                       "pr": [p for p in prs if isinstance(p, tuple)]}}
    support = {names[c]: int((y == c).sum()) for c in range(k)}
    for key, curves in (("roc_auc", rocs), ("average_precision", prs)):
        missing = [c for c in curves if isinstance(c, dict)]
        if is_binary(names):
            out[key] = curves[0][3] if not missing else missing[0]
        else:
            out[key] = float(np.mean([c[3] for c in curves])) if not missing else not_defined(
                f"{missing[0]['why']}: one-vs-rest needs rows in and out of every class", support=support)
    return out


def split_report(rows: list[dict], names: list[str]) -> dict:
    """Every number the report shows for one split."""
    k = len(names)
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[r["label"]] for r in rows])
    probs = np.array([r["probabilities"] for r in rows], dtype=float)
    pred = np.array([index[r["prediction"]] for r in rows])
    metrics = classification_metrics(pred.tolist(), y.tolist(), k)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    out = {
        "rows": len(rows), **metrics, **averaging(names),
        "per_class": per_class(y, pred, names),
        "confusion_matrix": confusion.tolist(),
        "ci95": bootstrap(y, pred, k),
    }
    out.update(ranking(y, probs, names))
    confidence = probs.max(1)
    out["calibration"] = calibration(confidence, (pred == y).astype(float))
    out["ece"] = out["calibration"]["ece"]
    wrong = [i for i in range(len(rows)) if pred[i] != y[i]]
    wrong.sort(key=lambda i: -confidence[i])
    out["confident_mistakes"] = [{"row": rows[i].get("row", i), "text": rows[i]["text"], "label": rows[i]["label"],
                                  "prediction": rows[i]["prediction"], "probability": float(confidence[i])}
                                 for i in wrong[:MISTAKES_SHOWN]]
    return out


def _scalars(path: Path) -> dict[str, list[list[float]]]:
    """metrics.jsonl -> {name: [[step, value], ...]}."""
    series: dict[str, list[list[float]]] = {}
    if not path.is_file():
        return series
    for entry in layout.read_jsonl(path)[0]:  # a torn last line (a run killed mid-write) is skipped
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append([entry["step"], float(value)])
    return series


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


def run_report(files: layout.RunDir) -> dict:
    """The report of one run directory (or one `llmkit eval` output directory): kind "classification" (from its
    predictions) or, for a causal-LM run that writes none, kind "lm" (loss and perplexity per split)."""
    found = files.prediction_splits()
    splits = [s for s in ("test", "validation") if s in found] + [s for s in found if s not in ("test", "validation")]
    metrics = files.read_metrics()
    scores = {k: {"loss": v["loss"], "perplexity": v["perplexity"]} for k, v in metrics.items()
              if isinstance(v, dict) and "perplexity" in v}
    if not splits and not scores:
        raise LlmkitError(f"{files.root} has neither predictions_<split>.jsonl nor language-model scores in "
                          "metrics.json: not a run directory or eval output")
    info, config = files.read_run_info(), files.read_config()
    # no path of the folder itself: an output is built beside its place and swapped in, and a run folder moves
    report = {"name": files.root.name, "kind": "classification" if splits else "lm", "splits": {},
              "primary_split": splits[0] if splits else next(iter(scores)), "scores": scores}
    for split in splits:
        rows, names = read_predictions(files.predictions(split), metrics.get("label_names"))
        report["splits"][split] = split_report(rows, names)
        report["label_names"] = names
        if (metrics.get(split) or {}).get("run_reported"):  # `llmkit eval` of the rows its export's run scored
            report["splits"][split]["run_reported"] = metrics[split]["run_reported"]
    train = metrics.get("train", {})
    data = config.get("data", {})
    task = "generative (label words)" if data.get("prompt_template") else \
        "sequence classification" if splits else "causal language modelling"
    report["config"] = config  # the whole of it: `llmkit report A B` lists where runs differ (report.runs)
    report["run"] = {
        "settings": runs.settings(config),
        "model": config.get("model", {}).get("name_or_path") or metrics.get("model"),
        "lora": bool(config.get("lora", {}).get("enabled")),
        "dataset": data.get("dataset") or data.get("data_files") or metrics.get("dataset") or
        (f"a mixture of {len(data['mixture'])} sources" if data.get("mixture") else None),
        "task": task,
        "split_rows": {"train": train.get("train_examples"),
                       **{s: report["splits"][s]["rows"] for s in splits}},
        "world_size": info.get("world_size", train.get("world_size")),
        "zero_stage": info.get("zero_stage", train.get("zero_stage")),
        "precision": info.get("precision", train.get("precision")),
        "device": info.get("device"),
        "steps": train.get("steps"), "epochs": train.get("epochs"),
        "train_seconds": train.get("train_seconds"),
        "samples_per_second": train.get("samples_per_second"),
        "real_tokens_per_second": train.get("real_tokens_per_second"),
        # every rank's peak held (GPU: reserved; CPU: resident set) and the largest, which is what to provision;
        # beside it the live peak (tensors held at once) and the preflight's estimate of it, under one name
        "peak_memory_gib": _gib(train.get("peak_memory_bytes")),
        "peak_memory_gib_per_rank": [_gib(b) for b in train.get("per_rank", {}).get("peak_memory_bytes", [])],
        "live_peak_gib": _gib(train.get("live_peak_bytes")),
        "live_peak_gib_per_rank": [_gib(b) for b in train.get("per_rank", {}).get("live_peak_bytes", [])],
        "live_peak_estimated_gib": _gib(train.get("live_peak_estimated_bytes")),
        "versions": info.get("versions"), "git_commit": info.get("git_commit"),
    }
    report["data_mixture"] = metrics.get("data_mixture") or []
    # the line files whose cut last line (a run killed mid-write) the numbers above skipped
    torn = [p.name for p in sorted(files.root.glob("*.jsonl")) if layout.read_jsonl(p)[1]]
    if torn:
        report["run"]["torn_last_line_skipped"] = torn
    report["explanations"] = layout.read_json(files.explanations) or None
    # the training rows' data map (llmkit.evals.datamap); its points are drawn, not kept in report.json
    mapped = layout.read_json(files.data_map)
    report["_data_map_points"] = mapped.pop("points", None)
    report["data_map"] = mapped or None
    # the quantized copies beside final/ and what each costs on the task (llmkit.ship.quantize)
    report["compression"] = [{"format": c["format"], "what": c["what"], "scored": c["scored"], **c["numbers"]}
                             for c in compression.copies(files.final.root)]
    scalars = _scalars(files.scalars)
    report["curves"] = {"train_loss": scalars.get("train/loss", []), "eval_loss": scalars.get("eval/loss", []),
                        "learning_rate": scalars.get("train/lr", []), "eval_f1": scalars.get("eval/f1", [])}
    return report
