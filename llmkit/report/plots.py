"""The report's plots as base64 PNGs (matplotlib, headless): confusion matrices, ROC and precision-recall curves,
the reliability diagram, loss and learning rate, the training data map."""

from __future__ import annotations

import base64
import io

import numpy as np


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def draw(runs: list[dict]) -> dict[str, str]:
    """name -> base64 PNG. One run: its own plots; several: overlaid curves and per-run confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    multi = len(runs) > 1
    if all(r["kind"] == "lm" for r in runs):
        return _training(runs, plots, multi)
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
        if r.get("data_map") and r.get("_data_map_points"):
            plots[f"datamap_{r['name']}"] = _data_map(r["name"], r["data_map"], r["_data_map_points"])

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
    return _training(runs, plots, multi)


def _training(runs: list[dict], plots: dict[str, str], multi: bool) -> dict[str, str]:
    """The loss and learning-rate curves, when something was trained."""
    import matplotlib.pyplot as plt

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


def _data_map(name: str, doc: dict, points: dict) -> str:
    """Confidence against variability, coloured by correctness, with the regions (Swayamdipta et al. 2020); a run
    of one epoch has no variability: the confidence of its rows, right and wrong, instead."""
    import matplotlib.pyplot as plt

    conf = np.array(points["confidence"], dtype=float)
    var = np.array([np.nan if v is None else v for v in points["variability"]], dtype=float)
    right = np.array(points["correctness"], dtype=float)
    drawn = f"{points['drawn']} of {doc['rows']} rows" if points["drawn"] < doc["rows"] else f"{doc['rows']} rows"
    fig, ax = plt.subplots(figsize=(6, 4.6))
    seen = ~np.isnan(var)
    cut = doc.get("ambiguous_from_variability")
    if seen.any() and cut is not None:
        dots = ax.scatter(var[seen], conf[seen], c=right[seen], cmap="viridis", vmin=0, vmax=1, s=7, alpha=0.6,
                          linewidths=0)
        fig.colorbar(dots, ax=ax, label="correctness (share of epochs right)")
        ax.axvline(cut, ls=":", color="grey")
        ax.plot([0, cut], [doc["easy_from_confidence"]] * 2, ":", color="grey")
        top = max(float(np.nanmax(var)), cut) * 1.05 or 0.05
        ax.set_xlim(0, top)
        ax.set_ylim(0, 1)
        for x, y, label in ((cut / 2, 0.97, "easy-to-learn"), (cut / 2, 0.03, "hard-to-learn"),
                            ((cut + top) / 2, 0.5, "ambiguous")):
            ax.text(x, y, label, ha="center", va="top" if y > 0.5 else "bottom", fontsize=9,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set_xlabel("variability (std of the given label's probability across epochs)")
        ax.set_ylabel("confidence (mean probability of the given label)")
        ax.set_title(f"{name}: training data map ({drawn})")
    else:
        bins = np.linspace(0, 1, 21)
        ax.hist([conf[right >= 0.5], conf[right < 0.5]], bins=bins, stacked=True, label=["right", "wrong"],
                color=["#3b8bc2", "#d1495b"])
        ax.set_xlabel("probability of the given label")
        ax.set_ylabel("training rows")
        ax.legend(fontsize=8)
        ax.set_title(f"{name}: one epoch, variability not measured ({drawn})")
    return _png(fig)
