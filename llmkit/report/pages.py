"""The report's pages: report.json, report.md and a self-contained report.html (plots embedded as PNG, no
network needed to open it), for one run or a comparison of several."""

from __future__ import annotations

import html
import json
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.metrics import metric_label, shown
from llmkit.report import cartography, explained, runs
from llmkit.report.numbers import run_report
from llmkit.report.plots import draw
from llmkit.report.undefined import defined, interval, says
from llmkit.rundir import outputs
from llmkit.rundir.layout import RunDir


def _public(split: dict) -> dict:
    return {k: v for k, v in split.items() if not k.startswith("_")}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if not defined(value):  # a statistic the rows cannot give: its reason and counts (llmkit.report.undefined)
        return says(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _seconds(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


MIXTURE_HEADER = ["source", "weight", "weight share", "examples drawn", "of available", "drawn share", "tokens"]
LM_HEADER = ["split", "loss", "perplexity"]


def _mixture_rows(r: dict) -> list[list]:
    return [[m["source"], f"{m['weight']:g}", f"{m['weight_share']:.1%}", m["examples"], m["available"],
             f"{m['drawn_share']:.1%}", m["tokens"]] for m in r["data_mixture"]]


COMPRESSION_HEADER = ["copy", "size on disk (x smaller; x smaller than fp32)", "accuracy: full -> copy",
                      "macro-F1 change", "agreement", "perplexity: full -> copy",
                      "speed-up per row over PyTorch fp32, batch 1 / 32"]


def _compression_rows(r: dict) -> list[list]:
    """What each quantized copy costs on the task (quantized.json), one row a copy."""
    rows = []
    for c in r.get("compression") or []:
        f, q = c["full"], c["copy"]
        rows.append([c["format"], f"{q['bytes'] / 2**20:.1f} MiB ({c['size_ratio']:.2f}x; "
                     f"{c['size_ratio_to_fp32']:.2f}x)",
                     f"{f['accuracy']:.4f} -> {q['accuracy']:.4f}" if "accuracy" in q else "-",
                     f"{100 * c['f1_macro_change']:+.2f} points" if "f1_macro_change" in c else "-",
                     c.get("agreement"),
                     f"{f['perplexity']:.4f} -> {q['perplexity']:.4f} ({100 * c['perplexity_change']:+.2f}%)"
                     if "perplexity" in q else "-",
                     f"{c['speedup_batch_1']:.2f}x / {c['speedup_batch_32']:.2f}x" if "speedup_batch_1" in c else "-"])
    return rows


def _compression_note(r: dict) -> str:
    """Where the copies were scored and what ran them (not always what would serve them)."""
    rows = r.get("compression") or []
    return (f"Each copy scored against the full model on {rows[0]['rows']} rows of {rows[0]['split']} in a fresh "
            "process. " + " ".join(f"{c['format']}: {c['scored']}." for c in rows)) if rows else ""


def _lm_rows(r: dict) -> list[list]:
    return [[split, s["loss"], s["perplexity"]] for split, s in r["scores"].items()]


def _comparison(runs: list[dict]) -> list[dict]:
    table = []
    for r in runs:
        if r["kind"] == "lm":
            s = r["scores"][r["primary_split"]]
            table.append({"run": r["name"], "model": r["run"]["model"], "split": r["primary_split"],
                          "loss": s["loss"], "perplexity": s["perplexity"], "train_seconds": r["run"]["train_seconds"]})
            continue
        s = r["splits"][r["primary_split"]]
        table.append({"run": r["name"], "model": r["run"]["model"], "split": r["primary_split"], "rows": s["rows"],
                      "accuracy": s["accuracy"], "accuracy_ci95": s["ci95"]["accuracy"], "f1": s["f1"],
                      "f1_ci95": s["ci95"]["f1"], "f1_of": metric_label("f1", r["label_names"]),
                      "f1_macro": s["f1_macro"], "roc_auc": s["roc_auc"],
                      "roc_auc_of": metric_label("roc_auc", r["label_names"]), "ece": s["ece"],
                      "train_seconds": r["run"]["train_seconds"]})
    return table


METRIC_HEADER = ["metric", "value", "95% CI"]


def _ci(ci: list[float] | dict) -> str:
    return interval(ci)


def _metric_rows(s: dict, names: list[str]) -> list[list]:
    """A split's metrics, each once, under a name that says what it is of (llmkit.metrics.metric_label)."""
    return [[metric_label(k, names), s[k], _ci(s["ci95"][k]) if k in s["ci95"] else ""] for k in shown(names)] + \
        [[metric_label(k, names), s[k], ""] for k in ("roc_auc", "average_precision")] + [["ECE", s["ece"], ""]]


def _rescored(s: dict) -> str:
    """A re-score of the rows the export's own run scored (an `llmkit eval` output): the run's number and why they
    differ; "" for anything else."""
    return f"Against the run's own number: {runs.rescored(s['run_reported'], s['accuracy'])}." \
        if s.get("run_reported") else ""


def _comparison_table(table: list[dict]) -> tuple[list[str], list[list]]:
    """Runs side by side. The F1 column is named by what every run's F1 is of when they agree (else each cell
    says); the macro-F1 column is left out when every run's F1 is already the macro one."""
    kinds, aucs = {c["f1_of"] for c in table}, {c["roc_auc_of"] for c in table}
    same = kinds.pop() if len(kinds) == 1 else None
    macro = same != metric_label("f1_macro", None)
    auc = aucs.pop() if len(aucs) == 1 else "ROC AUC (one-vs-rest, macro for more than two labels)"
    header = ["run", "model", "split", "rows", "accuracy (95% CI)", f"{same or 'F1'} (95% CI)",
              *(["F1 (macro)"] if macro else []), auc, "ECE", "train s"]
    rows = [[c["run"], c["model"], c["split"], c["rows"], f"{_fmt(c['accuracy'])} ({_ci(c['accuracy_ci95'])})",
             f"{_fmt(c['f1'])} ({_ci(c['f1_ci95'])})" + ("" if same else f", {c['f1_of']}"),
             *([c["f1_macro"]] if macro else []), c["roc_auc"], c["ece"], _seconds(c["train_seconds"])]
            for c in table]
    return header, rows


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in rows] + [""]


def _markdown_lm(doc: dict) -> str:
    lines = ["# Evaluation report", ""]
    if len(doc["runs"]) > 1:
        lines += ["## Comparison", ""] + md_table(["run", "model", "split", "loss", "perplexity", "train s"], [
            [c["run"], c["model"], c["split"], c["loss"], c["perplexity"], _seconds(c["train_seconds"])]
            for c in doc["comparison"]])
    for r in doc["runs"]:
        lines += [f"## {r['name']}", ""] + md_table(LM_HEADER, _lm_rows(r))
        if r.get("compression"):
            lines += ["### What compression costs", "", _compression_note(r), ""] + md_table(
                COMPRESSION_HEADER, _compression_rows(r))
        if r["data_mixture"]:
            lines += ["### Training data (mixture)", ""] + md_table(MIXTURE_HEADER, _mixture_rows(r))
        lines += ["### What was run", ""] + md_table(["", ""], runs.shown(r["run"]))
    return "\n".join(lines + _md_differences(doc))


def _markdown(doc: dict) -> str:
    if doc["kind"] == "lm":
        return _markdown_lm(doc)
    lines = ["# Evaluation report", ""]
    if len(doc["runs"]) > 1:
        lines += ["## Comparison", ""] + md_table(*_comparison_table(doc["comparison"]))
    for r in doc["runs"]:
        lines += [f"## {r['name']}", ""]
        for split, s in r["splits"].items():
            lines += [f"### {split} ({s['rows']} rows)", "", *([_rescored(s), ""] if _rescored(s) else [])]
            lines += md_table(METRIC_HEADER, _metric_rows(s, r["label_names"]))
            lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c['label']} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} | "
                      f"{c['support']} |" for c in s["per_class"]]
            lines.append("")
        s = r["splits"][r["primary_split"]]
        lines += [f"### Most confident mistakes ({r['primary_split']})", "",
                  "| text | gold | predicted | probability |", "|---|---|---|---|"]
        lines += [f"| {m['text'].replace('|', '/')} | {m['label']} | {m['prediction']} | {m['probability']:.4f} |"
                  for m in s["confident_mistakes"]]
        if r.get("explanations"):
            lines += [""] + explained.md_section(r["explanations"], r["label_names"])
        if r.get("data_map"):
            lines += [""] + cartography.md_section(r["data_map"])
        if r.get("compression"):
            lines += ["", "### What compression costs", "", _compression_note(r), ""] + md_table(
                COMPRESSION_HEADER, _compression_rows(r))[:-1]
        if r["data_mixture"]:
            lines += ["", "### Training data (mixture)", ""] + md_table(MIXTURE_HEADER, _mixture_rows(r))[:-1]
        lines += ["", "### What was run", ""] + md_table(["", ""], runs.shown(r["run"]))
    return "\n".join(lines + _md_differences(doc))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;margin:.4em 0}.plots{display:flex;flex-wrap:wrap;gap:1em}
code{background:#f3f3f3;padding:0 .2em}""" + explained.CSS


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plots: dict[str, str], name: str, alt: str) -> str:
    return f'<img class="plot" data-plot="{html.escape(name)}" alt="{html.escape(alt)}" ' \
           f'src="data:image/png;base64,{plots[name]}">'


def _head() -> list[str]:
    return ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>llmkit evaluation report</title>",
            f"<style>{CSS}</style></head><body><h1>Evaluation report</h1>"]


def _html_run_facts(r: dict) -> str:
    """What compression costs (when copies were made), a run's training data (when a mixture), what was run."""
    mix = ("<h3>What compression costs</h3>" + f"<p>{html.escape(_compression_note(r))}</p>"
           + table(COMPRESSION_HEADER, _compression_rows(r))) if r.get("compression") else ""
    mix += ("<h3>Training data (mixture)</h3>" + table(MIXTURE_HEADER, _mixture_rows(r))) if r["data_mixture"] \
        else ""
    return mix + "<h3>What was run</h3>" + table(["", ""], runs.shown(r["run"]))


def _differences(doc: dict) -> tuple[list[str], list[list]] | None:
    """How the runs' configs differ (header, rows), or None for one run or runs set alike."""
    if len(doc["runs"]) < 2:
        return None
    rows = runs.differences([r.get("config") or {} for r in doc["runs"]])
    return (["setting", *[r["name"] for r in doc["runs"]]], rows) if rows else None


def _md_differences(doc: dict) -> list[str]:
    found = _differences(doc)
    return ["", "## How the runs differ", ""] + md_table(*found) if found else []


def _html_differences(doc: dict) -> str:
    found = _differences(doc)
    return "<h2>How the runs differ</h2>" + table(*found) if found else ""


def _html_lm(doc: dict, plots: dict[str, str]) -> str:
    parts = _head()
    if len(doc["runs"]) > 1:
        parts.append("<h2>Comparison</h2>" + table(["run", "model", "split", "loss", "perplexity", "train s"], [
            [c["run"], c["model"], c["split"], c["loss"], c["perplexity"], _seconds(c["train_seconds"])]
            for c in doc["comparison"]]) + _html_differences(doc))
    for r in doc["runs"]:
        parts.append(f"<h2>{html.escape(r['name'])}</h2>" + table(LM_HEADER, _lm_rows(r)) + _html_run_facts(r))
    if "training" in plots:
        parts.append("<h2>Curves</h2>" + _img(plots, "training", "loss and learning rate"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html(doc: dict, plots: dict[str, str]) -> str:
    if doc["kind"] == "lm":
        return _html_lm(doc, plots)
    parts = _head()
    if len(doc["runs"]) > 1:
        parts.append("<h2>Comparison</h2>" + table(*_comparison_table(doc["comparison"])) + _html_differences(doc))
    for r in doc["runs"]:
        parts.append(f"<h2>{html.escape(r['name'])}</h2>")
        for split, s in r["splits"].items():
            parts.append(f"<h3>{html.escape(split)} ({s['rows']} rows)</h3>"
                         + (f"<p>{html.escape(_rescored(s))}</p>" if _rescored(s) else "")
                         + table(METRIC_HEADER, _metric_rows(s, r["label_names"])))
            parts.append(table(["class", "precision", "recall", "F1", "support"],
                                [[c["label"], c["precision"], c["recall"], c["f1"], c["support"]]
                                 for c in s["per_class"]]))
        parts.append(_img(plots, f"confusion_{r['name']}", f"confusion matrix of {r['name']}"))
    parts.append("<h2>Curves</h2><div class='plots'>" + _img(plots, "roc", "ROC curve") + _img(plots, "pr", "PR curve")
                 + _img(plots, "calibration", "reliability diagram") + "</div>"
                 + (_img(plots, "training", "loss and learning rate") if "training" in plots else ""))
    for r in doc["runs"]:
        s = r["splits"][r["primary_split"]]
        parts.append(f"<h2>{html.escape(r['name'])}: details</h2>")
        parts.append(f"<h3>Most confident mistakes ({html.escape(r['primary_split'])})</h3>" + table(
            ["text", "gold", "predicted", "probability"],
            [[m["text"], m["label"], m["prediction"], m["probability"]] for m in s["confident_mistakes"]]))
        if r.get("explanations"):
            parts.append(explained.html_section(r["explanations"], r["label_names"]))
        if r.get("data_map"):
            name = f"datamap_{r['name']}"
            parts.append(cartography.html_section(r["data_map"], _img(plots, name, f"training data map of {r['name']}")
                                                  if name in plots else ""))
        parts.append(_html_run_facts(r))
    parts.append("</body></html>")
    return "\n".join(parts)


def build(run_dirs: list[str | Path], out_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write report.json / report.md / report.html for the runs into `out_dir` (default: the only run's
    directory, whose report it is). Returns the paths. Another `out_dir` is a folder of its own: new or empty, or
    with `overwrite` an earlier report's, replaced whole (llmkit.rundir.outputs)."""
    if not run_dirs:
        raise LlmkitError("name at least one run directory")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise LlmkitError(f"run directory '{d}' does not exist")
    if out_dir is None and len(run_dirs) > 1:
        raise LlmkitError("with several runs, say where the report goes (--output DIR)")
    own = out_dir is None or (len(run_dirs) == 1 and Path(out_dir).resolve() == Path(run_dirs[0]).resolve())
    if not own:
        outputs.check(Path(out_dir), "llmkit report", (Path(out_dir) / outputs.REPORT_MARKER).is_file(),
                      outputs.REPORT_WRITES, overwrite)
    folders = [RunDir(Path(d)) for d in run_dirs]
    return _built(folders, RunDir(Path(out_dir)) if out_dir else folders[0], own)


def _built(folders: list[RunDir], out: RunDir, own: bool) -> dict[str, Path]:
    """The report of the runs in `folders`, written into `out` (`own`: the only run's folder, its report beside its
    records; else a folder of the report's own, swapped in whole once written). Returns the paths."""
    reports = [run_report(folder) for folder in folders]
    kinds = sorted({r["kind"] for r in reports})
    if len(kinds) > 1:
        raise LlmkitError(f"these runs are of different kinds ({', '.join(kinds)}): a report compares classifiers "
                          "with classifiers and language models with language models; build one report for each")
    names = [r["name"] for r in reports]
    for i, r in enumerate(reports):  # two runs with one folder name (a/run, b/run) stay distinguishable
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']}-{i + 1}"
    plots = draw(reports)
    doc = {"kind": kinds[0], "comparison": _comparison(reports),
           "runs": [{**_public(r), "splits": {k: _public(v) for k, v in r["splits"].items()}} for r in reports]}
    if own:  # the run's own report, beside its records
        _write(doc, plots, out)
    else:
        with outputs.replaced(out.root) as build:
            (build / outputs.REPORT_MARKER).write_text("written by `llmkit report`; a later report replaces it "
                                                       "whole with --overwrite\n")
            _write(doc, plots, RunDir(build))
    return out.reports()


def _write(doc: dict, plots: dict[str, str], out: RunDir) -> None:
    paths = out.reports()
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(_markdown(doc) + "\n")
    paths["html"].write_text(_html(doc, plots))


def write_for_run(run) -> None:
    """The report of a finished run, into its output directory (rank 0; the others wait)."""
    def write() -> None:
        paths = _built([run.dir], run.dir, own=True)
        run.log(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})")

    run.main_first(write, others=False)  # a failure on rank 0 reaches every rank, not a barrier's timeout
