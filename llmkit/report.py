"""The evaluation report of one or more classification runs: report.json, report.md and a self-contained
report.html (plots embedded as PNG, no network needed to open it).

Everything is computed from the files a run leaves: predictions_<split>.jsonl (text, gold, predicted label,
class probabilities), metrics.json, metrics.jsonl (logged scalars), training_config.yaml and run_info.json."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import yaml

from llmkit.errors import LlmkitError
from llmkit.metrics import classification_metrics

BOOTSTRAP_SAMPLES = 1000
CALIBRATION_BINS = 10
MISTAKES_SHOWN = 10


# ---------------------------------------------------------------------------------------------- the numbers


def read_predictions(path: Path, names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Rows of a predictions file and the label names in probability order (from metrics.json, else recovered
    from the rows: each prediction is the argmax of its probabilities)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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
    """Reliability bins of the top-class probability, and the expected calibration error."""
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
              seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of accuracy and F1 over rows resampled with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    accs, f1s = np.empty(samples), np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        accs[i] = (y[idx] == pred[idx]).mean()
        f1s[i] = _f1(y[idx], pred[idx], num_labels)
    return {"accuracy": [float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))],
            "f1": [float(np.percentile(f1s, 2.5)), float(np.percentile(f1s, 97.5))]}


def _per_class(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.array([np.sum((pred == c) & (y == c)) for c in range(k)], dtype=float)
    predicted = np.array([np.sum(pred == c) for c in range(k)], dtype=float)
    actual = np.array([np.sum(y == c) for c in range(k)], dtype=float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return precision, recall, f1


def _f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Binary F1 of class 1 for 2 classes, macro F1 otherwise (the headline F1, as in the run's metrics)."""
    f1 = _per_class(y, pred, k)[2]
    return float(f1[1] if k == 2 else f1.mean())


def split_report(rows: list[dict], names: list[str]) -> dict:
    """Every number the report shows for one split."""
    k = len(names)
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[r["label"]] for r in rows])
    probs = np.array([r["probabilities"] for r in rows], dtype=float)
    pred = np.array([index[r["prediction"]] for r in rows])
    metrics = classification_metrics(pred.tolist(), y.tolist(), k)
    precision, recall, f1 = _per_class(y, pred, k)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    out = {
        "rows": len(rows), **metrics,
        "per_class": [{"label": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
                       "f1": float(f1[c]), "support": int((y == c).sum())} for c in range(k)],
        "confusion_matrix": confusion.tolist(),
        "ci95": bootstrap(y, pred, k),
    }
    if k == 2:  # the curves rank rows by the probability of class 1 (the positive class of binary F1)
        fpr, tpr, auc = roc_curve((y == 1).astype(int), probs[:, 1])
        prec, rec, ap = pr_curve((y == 1).astype(int), probs[:, 1])
        out["roc_auc"], out["average_precision"] = auc, ap
        out["_curves"] = {"roc": [("", fpr, tpr, auc)], "pr": [("", rec, prec, ap)]}
    else:  # one-vs-rest for each class, macro average
        rocs, prs = [], []
        for c in range(k):
            fpr, tpr, auc = roc_curve((y == c).astype(int), probs[:, c])
            prec, rec, ap = pr_curve((y == c).astype(int), probs[:, c])
            rocs.append((names[c], fpr, tpr, auc))
            prs.append((names[c], rec, prec, ap))
        out["roc_auc"] = float(np.mean([r[3] for r in rocs]))
        out["average_precision"] = float(np.mean([p[3] for p in prs]))
        out["_curves"] = {"roc": rocs, "pr": prs}
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
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append([entry["step"], float(value)])
    return series


def run_report(run_dir: Path) -> dict:
    """The report of one run directory (or one `llmkit eval` output directory)."""
    run_dir = Path(run_dir)
    found = sorted(p.name[len("predictions_"):-len(".jsonl")] for p in run_dir.glob("predictions_*.jsonl"))
    splits = [s for s in ("test", "validation") if s in found] + [s for s in found if s not in ("test", "validation")]
    if not splits:
        raise LlmkitError(f"{run_dir} has no predictions_<split>.jsonl: not a classification run or eval output")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    config = yaml.safe_load((run_dir / "training_config.yaml").read_text()) \
        if (run_dir / "training_config.yaml").is_file() else {}
    report = {"name": run_dir.name, "path": str(run_dir.resolve()), "splits": {}, "primary_split": splits[0]}
    for split in splits:
        rows, names = read_predictions(run_dir / f"predictions_{split}.jsonl", metrics.get("label_names"))
        report["splits"][split] = split_report(rows, names)
        report["label_names"] = names
    train = metrics.get("train", {})
    data = config.get("data", {})
    report["run"] = {
        "model": config.get("model", {}).get("name_or_path") or metrics.get("model"),
        "lora": bool(config.get("lora", {}).get("enabled")),
        "dataset": data.get("dataset") or data.get("data_files") or metrics.get("dataset"),
        "task": "generative (label words)" if data.get("prompt_template") else "sequence classification",
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
        "versions": info.get("versions"), "git_commit": info.get("git_commit"),
    }
    scalars = _scalars(run_dir / "metrics.jsonl")
    report["curves"] = {"train_loss": scalars.get("train/loss", []), "eval_loss": scalars.get("eval/loss", []),
                        "learning_rate": scalars.get("train/lr", []), "eval_f1": scalars.get("eval/f1", [])}
    return report


# ----------------------------------------------------------------------------------------------- the plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(runs: list[dict]) -> dict[str, str]:
    """name -> base64 PNG. One run: its own plots; several: overlaid curves and per-run confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for r in runs:
        s = r["splits"][r["primary_split"]]
        names = r["label_names"]
        fig, ax = plt.subplots(figsize=(3.6 + 0.3 * len(names), 3.2 + 0.3 * len(names)))
        cm = np.array(s["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(f"{r['name']}: confusion ({r['primary_split']})")
        plots[f"confusion_{r['name']}"] = _png(fig)

    multi = len(runs) > 1
    for kind, xlabel, ylabel in (("roc", "false positive rate", "true positive rate"), ("pr", "recall", "precision")):
        fig, ax = plt.subplots(figsize=(4.6, 4))
        for r in runs:
            for label, x, y, area in r["splits"][r["primary_split"]]["_curves"][kind]:
                name = " ".join(p for p in (r["name"] if multi else "", label) if p)
                ax.plot(x, y, label=f"{name or 'model'} ({'AUC' if kind == 'roc' else 'AP'} {area:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("ROC curve" if kind == "roc" else "precision-recall curve")
        ax.legend(fontsize=8)
        plots[kind] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for r in runs:
        s = r["splits"][r["primary_split"]]
        bins = s["calibration"]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                label=f"{r['name'] if multi else 'model'} (ECE {s['ece']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(fontsize=8)
    plots["calibration"] = _png(fig)

    if not any(r["curves"]["train_loss"] or r["curves"]["eval_loss"] for r in runs):
        return plots  # `llmkit eval` outputs: nothing was trained
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for r in runs:
        prefix = f"{r['name']} " if multi else ""
        for key, style in (("train_loss", "-"), ("eval_loss", "o--")):
            pts = r["curves"][key]
            if pts:
                loss_ax.plot(*zip(*pts), style, label=prefix + key.replace("_", " "))
        if r["curves"]["learning_rate"]:
            lr_ax.plot(*zip(*r["curves"]["learning_rate"]), label=prefix.strip() or "learning rate")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_title("loss")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_title("learning rate")
    for ax in (loss_ax, lr_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    plots["training"] = _png(fig)
    return plots


# ------------------------------------------------------------------------------------------------ the files


def _public(split: dict) -> dict:
    return {k: v for k, v in split.items() if not k.startswith("_")}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _seconds(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def _comparison(runs: list[dict]) -> list[dict]:
    table = []
    for r in runs:
        s = r["splits"][r["primary_split"]]
        table.append({"run": r["name"], "model": r["run"]["model"], "split": r["primary_split"], "rows": s["rows"],
                      "accuracy": s["accuracy"], "accuracy_ci95": s["ci95"]["accuracy"], "f1": s["f1"],
                      "f1_ci95": s["ci95"]["f1"], "f1_macro": s["f1_macro"], "roc_auc": s["roc_auc"],
                      "ece": s["ece"], "train_seconds": r["run"]["train_seconds"]})
    return table


def _markdown(doc: dict) -> str:
    lines = ["# Evaluation report", ""]
    if len(doc["runs"]) > 1:
        lines += ["## Comparison", "", "| run | model | split | rows | accuracy (95% CI) | F1 (95% CI) | macro F1 | "
                  "ROC AUC | ECE | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in doc["comparison"]:
            lines.append(f"| {c['run']} | {c['model']} | {c['split']} | {c['rows']} | {c['accuracy']:.4f} "
                         f"({c['accuracy_ci95'][0]:.4f}-{c['accuracy_ci95'][1]:.4f}) | {c['f1']:.4f} "
                         f"({c['f1_ci95'][0]:.4f}-{c['f1_ci95'][1]:.4f}) | {c['f1_macro']:.4f} | "
                         f"{c['roc_auc']:.4f} | {c['ece']:.4f} | {_seconds(c['train_seconds'])} |")
        lines.append("")
    for r in doc["runs"]:
        lines += [f"## {r['name']}", ""]
        for split, s in r["splits"].items():
            lines += [f"### {split} ({s['rows']} rows)", "",
                      "| metric | value | 95% CI |", "|---|---|---|",
                      f"| accuracy | {s['accuracy']:.4f} | {s['ci95']['accuracy'][0]:.4f}-"
                      f"{s['ci95']['accuracy'][1]:.4f} |",
                      f"| F1 | {s['f1']:.4f} | {s['ci95']['f1'][0]:.4f}-{s['ci95']['f1'][1]:.4f} |",
                      f"| macro F1 | {s['f1_macro']:.4f} | |", f"| precision | {s['precision']:.4f} | |",
                      f"| recall | {s['recall']:.4f} | |", f"| ROC AUC | {s['roc_auc']:.4f} | |",
                      f"| average precision | {s['average_precision']:.4f} | |", f"| ECE | {s['ece']:.4f} | |", "",
                      "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c['label']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
                      for c in s["per_class"]]
            lines.append("")
        s = r["splits"][r["primary_split"]]
        lines += [f"### Most confident mistakes ({r['primary_split']})", "",
                  "| text | gold | predicted | probability |", "|---|---|---|---|"]
        lines += [f"| {m['text'].replace('|', '/')} | {m['label']} | {m['prediction']} | {m['probability']:.4f} |"
                  for m in s["confident_mistakes"]]
        lines += ["", "### What was run", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(json.dumps(v) if isinstance(v, dict) else v)} |" for k, v in r["run"].items()]
        lines.append("")
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;margin:.4em 0}.plots{display:flex;flex-wrap:wrap;gap:1em}
code{background:#f3f3f3;padding:0 .2em}"""


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plots: dict[str, str], name: str, alt: str) -> str:
    return f'<img class="plot" data-plot="{html.escape(name)}" alt="{html.escape(alt)}" ' \
           f'src="data:image/png;base64,{plots[name]}">'


def _html(doc: dict, plots: dict[str, str]) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>llmkit evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1>"]
    if len(doc["runs"]) > 1:
        parts.append("<h2>Comparison</h2>" + _table(
            ["run", "model", "split", "rows", "accuracy", "accuracy 95% CI", "F1", "F1 95% CI", "macro F1", "ROC AUC",
             "ECE", "train s"],
            [[c["run"], c["model"], c["split"], c["rows"], c["accuracy"],
              f"{c['accuracy_ci95'][0]:.4f}-{c['accuracy_ci95'][1]:.4f}", c["f1"],
              f"{c['f1_ci95'][0]:.4f}-{c['f1_ci95'][1]:.4f}", c["f1_macro"], c["roc_auc"], c["ece"],
              _seconds(c["train_seconds"])] for c in doc["comparison"]]))
    for r in doc["runs"]:
        parts.append(f"<h2>{html.escape(r['name'])}</h2>")
        for split, s in r["splits"].items():
            parts.append(f"<h3>{html.escape(split)} ({s['rows']} rows)</h3>" + _table(
                ["metric", "value", "95% CI"],
                [["accuracy", s["accuracy"], f"{s['ci95']['accuracy'][0]:.4f}-{s['ci95']['accuracy'][1]:.4f}"],
                 ["F1", s["f1"], f"{s['ci95']['f1'][0]:.4f}-{s['ci95']['f1'][1]:.4f}"],
                 ["macro F1", s["f1_macro"], ""], ["precision", s["precision"], ""], ["recall", s["recall"], ""],
                 ["ROC AUC", s["roc_auc"], ""], ["average precision", s["average_precision"], ""],
                 ["ECE", s["ece"], ""]]))
            parts.append(_table(["class", "precision", "recall", "F1", "support"],
                                [[c["label"], c["precision"], c["recall"], c["f1"], c["support"]]
                                 for c in s["per_class"]]))
        parts.append(_img(plots, f"confusion_{r['name']}", f"confusion matrix of {r['name']}"))
    parts.append("<h2>Curves</h2><div class='plots'>" + _img(plots, "roc", "ROC curve") + _img(plots, "pr", "PR curve")
                 + _img(plots, "calibration", "reliability diagram") + "</div>"
                 + (_img(plots, "training", "loss and learning rate") if "training" in plots else ""))
    for r in doc["runs"]:
        s = r["splits"][r["primary_split"]]
        parts.append(f"<h2>{html.escape(r['name'])}: details</h2>")
        parts.append(f"<h3>Most confident mistakes ({html.escape(r['primary_split'])})</h3>" + _table(
            ["text", "gold", "predicted", "probability"],
            [[m["text"], m["label"], m["prediction"], m["probability"]] for m in s["confident_mistakes"]]))
        parts.append("<h3>What was run</h3>" + _table(
            ["", ""], [[k, json.dumps(v) if isinstance(v, dict) else v] for k, v in r["run"].items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def build(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.json / report.md / report.html for the runs into `out_dir` (default: the only run's
    directory). Returns the paths."""
    if not run_dirs:
        raise LlmkitError("name at least one run directory")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise LlmkitError(f"run directory '{d}' does not exist")
    runs = [run_report(Path(d)) for d in run_dirs]
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):  # two runs with one folder name (a/run, b/run) stay distinguishable
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']}-{i + 1}"
    if out_dir is None:
        if len(runs) > 1:
            raise LlmkitError("with several runs, say where the report goes (--output DIR)")
        out_dir = Path(run_dirs[0])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs)
    doc = {"runs": [{**r, "splits": {k: _public(v) for k, v in r["splits"].items()}} for r in runs],
           "comparison": _comparison(runs)}
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(_markdown(doc) + "\n")
    paths["html"].write_text(_html(doc, plots))
    return paths


def write_for_run(run) -> None:
    """The report of a finished classification run, into its output directory (rank 0; the others wait)."""
    if run.accelerator.is_main_process:
        paths = build([run.output_dir])
        run.log(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})")
    run.accelerator.wait_for_everyone()
