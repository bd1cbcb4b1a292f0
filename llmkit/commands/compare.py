"""`llmkit compare A B [C ...]`: exported classifiers scored on the same rows, each by `llmkit eval` in a fresh
process, then for every pair what a reviewer asks before believing that one is better: the differences in
accuracy and macro-F1 with paired-bootstrap confidence intervals, McNemar's exact test on the rows where they
disagree, and how often they agree. Written as compare.json and compare.md."""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

from llmkit import fresh
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import Export, RunDir, read_json, read_jsonl

MARKER = ".llmkit-compare"  # a `llmkit compare` output folder, which a later compare may write over


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise LlmkitError(f"--output {out} already holds files `llmkit compare` did not write; pick a new or empty "
                          "folder")


def _score(model: str, out: Path, source: str, split: str, eval_args: list[str]) -> dict:
    """`llmkit eval` of one model into `out`, in a fresh process: its labels, and per row the gold and predicted
    label ids, in row order."""
    proc = fresh.run_python(["-m", "llmkit.cli", "eval", str(model), "--data", source, "--split", split,
                             "--output", str(out), *eval_args], cwd=out.parent)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
        raise LlmkitError(f"scoring {model} failed: " + (said[-1].removeprefix("llmkit: error: ") if said else
                                                         proc.stderr[-2000:]))
    files = RunDir(out)
    metrics = read_json(files.metrics)
    names = metrics["label_names"]
    rows, _ = read_jsonl(files.predictions(split))
    rows.sort(key=lambda r: r["row"])
    index = {name: i for i, name in enumerate(names)}
    return {"model": str(model), "labels": names, "metrics": metrics[split],
            "seconds_per_row": metrics["eval_seconds"] / max(metrics[split]["samples"], 1),
            "gold": np.array([index[r["label"]] for r in rows]), "predicted": np.array([index[r["prediction"]]
                                                                                       for r in rows]),
            "confidence": np.array([max(r["probabilities"]) for r in rows]),
            "length": np.array([len(r["text"]) + len(r.get("text_pair") or "") for r in rows])}


def ece(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the row-weighted gap between confidence and accuracy over equal-width bins of
    the predicted label's probability."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(confidence[which == k].mean() - right[which == k].mean()) * (which == k).mean()
                     for k in range(bins) if (which == k).any()))


def _slices(first: dict) -> dict[str, np.ndarray]:
    """Row masks by true label and by text length (quartiles of characters)."""
    masks = {f"label = {name}": first["gold"] == i for i, name in enumerate(first["labels"])}
    edges = np.quantile(first["length"], [0.25, 0.5, 0.75])
    which = np.searchsorted(edges, first["length"], side="right")
    for q in range(4):
        if (which == q).any():
            lo, hi = int(first["length"][which == q].min()), int(first["length"][which == q].max())
            masks[f"length Q{q + 1} ({lo}-{hi} chars)"] = which == q
    return masks


def _labels_of(model: str, zero_shot: list[str] | None) -> list[str] | None:
    """A model's labels in order, read from its files before anything is scored (None where they do not say):
    a classifier's id2label, a label-word export's run records, the label words given for zero-shot."""
    if model.startswith("zero-shot:"):
        return zero_shot[zero_shot.index("--label-words") + 1:] if zero_shot else None
    folder = Path(model)
    config = read_json(folder / "config.json")
    if config.get("id2label"):
        return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    return Export(folder).read_metrics().get("label_names") or None


def pair(gold: np.ndarray, a: np.ndarray, b: np.ndarray, classes: int, resamples: int = 2000, seed: int = 0) -> dict:
    """A against B on the same rows: accuracy and macro-F1 differences (A - B) with 95% paired-bootstrap
    intervals (the rows resampled together for both), McNemar's exact test (a two-sided binomial test on the rows
    exactly one of them gets right), and the agreement rate."""
    from scipy.stats import binomtest
    from sklearn.metrics import f1_score

    def macro_f1(y, p):
        return f1_score(y, p, labels=list(range(classes)), average="macro", zero_division=0)

    n = len(gold)
    right_a, right_b = a == gold, b == gold
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    acc = right_a[draws].mean(1) - right_b[draws].mean(1)
    f1 = np.array([macro_f1(gold[d], a[d]) - macro_f1(gold[d], b[d]) for d in draws])
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"rows": n, "accuracy_difference": float(right_a.mean() - right_b.mean()),
            "accuracy_difference_ci95": [float(np.percentile(acc, 2.5)), float(np.percentile(acc, 97.5))],
            "f1_macro_difference": float(macro_f1(gold, a) - macro_f1(gold, b)),
            "f1_macro_difference_ci95": [float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))],
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_exact_p": float(p),
            "agreement": float((a == b).mean()), "bootstrap_resamples": resamples, "seed": seed}


def compare(models: list[str | Path], source: str, split: str, output_dir: str | Path, eval_args: list[str],
            resamples: int = 2000, seed: int = 0, zero_shot: list[str] | None = None) -> dict:
    """Score each model on `split` of `source` and compare every pair; write compare.json and compare.md into
    `output_dir`. `eval_args`: more `llmkit eval` options (columns, max length, batch size, max samples);
    `zero_shot`: the eval options of the models named zero-shot:<model> (template, label words)."""
    if len(models) < 2:
        raise LlmkitError("llmkit compare needs at least two models")
    if resamples < 100:
        raise LlmkitError(f"--resamples must be >= 100 for a 95% interval to mean anything, got {resamples}")
    labels = {str(m): _labels_of(str(m), zero_shot) for m in models}
    known = {m: names for m, names in labels.items() if names is not None}
    if len({tuple(names) for names in known.values()}) > 1:  # refused before any model is scored
        (a, first), (b, other) = next(iter(known.items())), next((m, n) for m, n in known.items()
                                                                if n != next(iter(known.values())))
        raise LlmkitError(f"the models classify into different labels: {a} has {first}, {b} has {other}; compare "
                          "models of the same task and label order")
    out = Path(output_dir).expanduser()
    _check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `llmkit compare`; a later compare may replace these files\n")
    scored = []
    for i, model in enumerate(models):
        print(f"compare: scoring {model} ({i + 1} of {len(models)})", file=sys.stderr, flush=True)
        name = str(model)
        extra = zero_shot if name.startswith("zero-shot:") and zero_shot else []
        scored.append(_score(name.removeprefix("zero-shot:"), out / f"model-{i + 1}", source, split,
                             eval_args + extra))
        scored[-1]["model"] = name
    first = scored[0]
    for s in scored[1:]:
        if s["labels"] != first["labels"]:
            raise LlmkitError(f"the models classify into different labels: {first['model']} has {first['labels']}, "
                              f"{s['model']} has {s['labels']}; compare models of the same task and label order")
    names = [f"model-{i + 1}" for i in range(len(scored))]
    slices = {name: {"rows": int(mask.sum()),
                     "accuracy": {m: float((s["predicted"][mask] == s["gold"][mask]).mean())
                                  for m, s in zip(names, scored)},
                     "pairs": [{"a": names[i], "b": names[j],
                                **pair(first["gold"][mask], scored[i]["predicted"][mask],
                                       scored[j]["predicted"][mask], len(first["labels"]), max(resamples // 4, 100),
                                       seed)} for i, j in combinations(range(len(scored)), 2)]}
              for name, mask in _slices(first).items()}
    doc = {"split": split, "data": source, "labels": first["labels"],
           "models": [{"name": names[i], "model": s["model"], **{k: s["metrics"][k] for k in
                       ("accuracy", "f1_macro", "samples")}, "seconds_per_row": s["seconds_per_row"],
                       "ece": ece(s["confidence"], s["predicted"] == s["gold"])}
                      for i, s in enumerate(scored)],
           "slices": slices,
           "pairs": [{"a": f"model-{i + 1}", "b": f"model-{j + 1}",
                      **pair(first["gold"], scored[i]["predicted"], scored[j]["predicted"], len(first["labels"]),
                             resamples, seed)}
                     for i, j in combinations(range(len(scored)), 2)]}
    (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "compare.md").write_text(_markdown(doc))
    return doc


def _markdown(doc: dict) -> str:
    lines = [f"# Comparison on {doc['split']} of {doc['data']} ({doc['models'][0]['samples']} rows)", "",
             "| model | folder | accuracy | macro-F1 | ECE | ms per row |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['name']} | {m['model']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | {m['ece']:.4f} | "
              f"{1000 * m['seconds_per_row']:.2f} |" for m in doc["models"]]
    lines += ["", "| A vs B | accuracy A - B (95% CI) | macro-F1 A - B (95% CI) | only A right / only B right | "
              "McNemar exact p | agreement |", "|---|---|---|---|---|---|"]
    for p in doc["pairs"]:
        acc_lo, acc_hi = p["accuracy_difference_ci95"]
        f1_lo, f1_hi = p["f1_macro_difference_ci95"]
        lines.append(f"| {p['a']} vs {p['b']} | {p['accuracy_difference']:+.4f} ({acc_lo:+.4f}, {acc_hi:+.4f}) | "
                     f"{p['f1_macro_difference']:+.4f} ({f1_lo:+.4f}, {f1_hi:+.4f}) | {p['only_a_right']} / "
                     f"{p['only_b_right']} | {p['mcnemar_exact_p']:.4g} | {p['agreement']:.4f} |")
    names = [m["name"] for m in doc["models"]]
    lines += ["", "## Slices", "", "| slice | rows | " + " | ".join(f"{n} accuracy" for n in names)
              + " | A vs B: accuracy A - B (95% CI), McNemar p |", "|---|---|" + "---|" * len(names) + "---|"]
    for name, s in doc["slices"].items():
        diffs = "; ".join(f"{p['a']} vs {p['b']} {p['accuracy_difference']:+.3f} "
                          f"({p['accuracy_difference_ci95'][0]:+.3f}, {p['accuracy_difference_ci95'][1]:+.3f}), "
                          f"p {p['mcnemar_exact_p']:.3g}" for p in s["pairs"])
        lines.append(f"| {name} | {s['rows']} | " + " | ".join(f"{s['accuracy'][n]:.3f}" for n in names)
                     + f" | {diffs} |")
    lines += ["", "A difference whose interval holds 0, or a McNemar p above your threshold, is not shown to be "
              "real on these rows. ECE: expected calibration error of the predicted label's probability (10 bins)."]
    return "\n".join(lines) + "\n"
