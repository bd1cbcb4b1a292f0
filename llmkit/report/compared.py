"""The pages of `llmkit compare`: compare.json (every number), compare.md and a self-contained compare.html (no
script, no network), built from the document llmkit.commands.compare assembles."""

from __future__ import annotations

import html
import json
from pathlib import Path

from llmkit.report import explained
from llmkit.report.pages import CSS, md_table, table

NOT_SHOWN = ("A difference whose interval holds 0, or whose McNemar p is 0.05 or more, is not shown to be real on "
             "these rows. ECE: expected calibration error of the predicted label's probability (10 bins); after T: "
             "with the logits divided by the one temperature that fits the calibration split best (predictions "
             "unchanged).")


def _ci(value: float, ci: list[float], scale: float = 100.0) -> str:
    return f"{scale * value:+.2f} ({scale * ci[0]:+.2f} to {scale * ci[1]:+.2f})"


def _models(doc: dict) -> tuple[list[str], list[list]]:
    header = ["model", "name", "folder", "accuracy (95% CI)", "macro-F1", "ECE", "temperature", "ECE after T",
              "ms per row"]
    rows = [[m["name"], m["label"], m["model"], f"{m['accuracy']:.4f} ({m['accuracy_ci95'][0]:.4f}-"
             f"{m['accuracy_ci95'][1]:.4f})", m["f1_macro"], m["ece"],
             (f"{t['temperature']:.3f}" + (" (the search's bound)" if t["at_bound"] else "")) if (t := m.get(
                 "temperature")) else None,
             m["temperature"]["ece_after"] if m.get("temperature") else None, f"{1000 * m['seconds_per_row']:.2f}"]
            for m in doc["models"]]
    return header, rows


def _per_class(doc: dict) -> tuple[list[str], list[list]]:
    return ["model", "class", "precision", "recall", "F1", "support"], [
        [m["name"], c["label"], c["precision"], c["recall"], c["f1"], c["support"]]
        for m in doc["models"] for c in m["per_class"]]


def _pairs(pairs: list[dict]) -> tuple[list[str], list[list]]:
    header = ["A vs B", "accuracy A - B, points (95% CI)", "macro-F1 A - B, points (95% CI)",
              "only A right / only B right", "McNemar exact p", "significant at 5%", "agreement"]
    return header, [[f"{p['a']} vs {p['b']}", _ci(p["accuracy_difference"], p["accuracy_difference_ci95"]),
                     _ci(p["f1_macro_difference"], p["f1_macro_difference_ci95"]),
                     f"{p['only_a_right']} / {p['only_b_right']}", f"{p['mcnemar_exact_p']:.4g}",
                     "yes" if p["significant"] else "no", p["agreement"]] for p in pairs]


def _slices(doc: dict) -> tuple[list[str], list[list]]:
    names = [m["name"] for m in doc["models"]]
    header = ["slice", "rows", *(f"{n} accuracy" for n in names), "A vs B: accuracy A - B, points (95% CI), p"]
    return header, [[name, s["rows"], *(s["accuracy"][n] for n in names),
                     "; ".join(f"{p['a']} vs {p['b']} {_ci(p['accuracy_difference'], p['accuracy_difference_ci95'])}"
                               f", p {p['mcnemar_exact_p']:.3g}" for p in s["pairs"])]
                    for name, s in doc["slices"].items()]


def verdict(doc: dict) -> list[str]:
    """One sentence per pair: which model is better at the 5% level, or that the rows do not show it."""
    label = {m["name"]: f"{m['name']} ({m['label']})" for m in doc["models"]}
    out = []
    for p in doc["pairs"]:
        diff = 100 * p["accuracy_difference"]
        if p["significant"]:
            better, worse = (p["a"], p["b"]) if diff > 0 else (p["b"], p["a"])
            out.append(f"{label[better]} is more accurate than {label[worse]} by {abs(diff):.2f} points: significant "
                       f"at the 5% level (McNemar p = {p['mcnemar_exact_p']:.3g}).")
        else:
            out.append(f"{label[p['a']]} vs {label[p['b']]}: {diff:+.2f} points, not significant at the 5% level "
                       f"(McNemar p = {p['mcnemar_exact_p']:.3g}).")
    return out


def _calibration_line(doc: dict) -> str:
    if doc["calibration_split"]:
        return f"Temperatures fitted on the {doc['calibration_split']} split."
    return f"No temperature fitted: {doc['calibration_note']}."


def markdown(doc: dict) -> str:
    rows = doc["models"][0]["rows"]
    lines = [f"# Comparison on {doc['split']} of {doc['data']} ({rows} rows)", ""]
    lines += [f"- {line}" for line in verdict(doc)] + ["", *md_table(*_models(doc)), _calibration_line(doc), ""]
    lines += ["## Pairs", "", *md_table(*_pairs(doc["pairs"])), "## Per class", "", *md_table(*_per_class(doc))]
    lines += ["## Slices", "", *md_table(*_slices(doc))]
    if doc["disagreements"]:
        lines += ["## Where they disagree most confidently", "",
                  "| A vs B | text | gold | each model: prediction (p), strongest words |", "|---|---|---|---|"]
        for d in doc["disagreements"]:
            said = "; ".join(f"{m}: {v['prediction']} ({v['probability']:.3f})"
                             + (f", {explained.top_words(v['explanation'], doc['labels'])}"
                                if "words" in v.get("explanation", {}) else "") for m, v in d["predictions"].items())
            lines.append(f"| {d['a']} vs {d['b']} | {d['text'].replace('|', '/')} | {d['label']} | "
                         f"{said.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines + [NOT_SHOWN]) + "\n"


def _disagreements_html(doc: dict) -> str:
    if not doc["disagreements"]:
        return ""
    green, red = (doc["labels"][1], doc["labels"][0]) if len(doc["labels"]) == 2 else ("the prediction",
                                                                                       "against it")
    parts = ["<h2>Where they disagree most confidently</h2><p class='legend'>Per pair, the rows where the less sure "
             "of the two models is surest. Each model's own reasons, word by word (integrated gradients): "
             f"<span class='up' style='background:rgba(26,127,55,.5)'>toward {html.escape(green)}</span>"
             f"<span class='down' style='background:rgba(180,35,24,.5)'>toward {html.escape(red)}</span></p>",
             "<table><tr><th>A vs B</th><th>gold</th><th>model</th><th>predicted (p)</th><th>text, by its "
             "attribution</th></tr>"]
    for d in doc["disagreements"]:
        for k, (name, v) in enumerate(d["predictions"].items()):
            why = v.get("explanation", {})
            text = explained.words_html(why, doc["labels"]) if "words" in why else html.escape(
                d["text"] + (f" (not explained: {why['error']})" if "error" in why else ""))
            lead = (f"<td rowspan='2'>{html.escape(d['a'])} vs {html.escape(d['b'])}</td>"
                    f"<td rowspan='2'>{html.escape(d['label'])}</td>") if k == 0 else ""
            parts.append(f"<tr>{lead}<td>{html.escape(name)}</td><td>{html.escape(v['prediction'])} "
                         f"({v['probability']:.3f})</td><td class='why'>{text}</td></tr>")
    return "\n".join(parts + ["</table>"])


def page(doc: dict) -> str:
    rows = doc["models"][0]["rows"]
    title = f"Comparison on {doc['split']} of {doc['data']} ({rows} rows)"
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><ul class='verdict'>"
             + "".join(f"<li>{html.escape(line)}</li>" for line in verdict(doc)) + "</ul>",
             "<h2>Models</h2>" + table(*_models(doc)) + f"<p>{html.escape(_calibration_line(doc))}</p>",
             "<h2>Pairs</h2>" + table(*_pairs(doc["pairs"])),
             "<h2>Per class</h2>" + table(*_per_class(doc)),
             "<h2>Slices</h2>" + table(*_slices(doc)),
             _disagreements_html(doc), f"<p>{html.escape(NOT_SHOWN)}</p></body></html>"]
    return "\n".join(parts)


def write(doc: dict, out: Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.html into `out`."""
    paths = {kind: out / f"compare.{kind}" for kind in ("json", "md", "html")}
    paths["json"].write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown(doc))
    paths["html"].write_text(page(doc))
    return paths
