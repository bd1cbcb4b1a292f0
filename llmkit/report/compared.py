"""The pages of `llmkit compare`: compare.json (every number), compare.md and a self-contained compare.html (no
script, no network), built from the document llmkit.commands.compare assembles."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from llmkit.report import explained, runs
from llmkit.report.pages import CSS, md_table, table
from llmkit.report.undefined import defined, finite, interval, says, shown
from llmkit.rundir import layout

NOT_SHOWN = ("The verdicts are McNemar's exact test with Holm's correction for the number of pairs: a difference "
             "whose corrected p is 0.05 or more is not shown to be real on these rows, whatever its interval (the "
             "percentile interval is narrow where few rows are discordant). The slices' p-values are exploratory: "
             "uncorrected for how many slices and pairs there are. ECE: expected calibration error of the predicted "
             "label's probability (10 bins); after T: with the logits divided by the one temperature that fits the "
             "calibration split best (predictions unchanged). \"not defined\": the rows cannot give that number "
             "(too few rows, one class, no discordant row, no best temperature); the counts say what they held.")


def _diff(value, ci) -> str:
    """A difference in points with its interval, or why either is missing."""
    if not defined(value):
        return says(value)
    return f"{100 * value:+.2f} ({interval(ci, '+.2f', 100.0, ' to ')})"


def _resampled(count: int | None, main: int | None) -> str:
    """', 500 resamples' where an interval was drawn from another number of resamples than the pairs'."""
    return f", {count} resamples" if count and count != main else ""


def _temperature(t: dict | None) -> str | None:
    if not t:
        return None
    if not defined(t):
        return says(t)
    return f"{t['temperature']:.3f}" + (" (the search's upper bound: no confidence fits best)" if t["at_bound"]
                                        else "")


def _models(doc: dict) -> tuple[list[str], list[list]]:
    count = next((m["accuracy_ci95_resamples"] for m in doc["models"] if "accuracy_ci95_resamples" in m), None)
    header = ["model", "name", "folder", f"accuracy (95% CI{_resampled(count, doc.get('bootstrap_resamples'))})",
              "macro-F1", "ECE", "temperature", "ECE after T", "ms per row"]
    rows = [[m["name"], m["label"], m["model"], f"failed: {m['error']}", None, None, None, None, None]
            if "error" in m else
            [m["name"], m["label"], m["model"], f"{m['accuracy']:.4f} ({interval(m['accuracy_ci95'])})",
             m["f1_macro"], m["ece"], _temperature(m.get("temperature")),
             (m.get("temperature") or {}).get("ece_after"), f"{1000 * m['seconds_per_row']:.2f}"]
            for m in doc["models"]]
    return header, rows


def _per_class(doc: dict) -> tuple[list[str], list[list]]:
    return ["model", "class", "precision", "recall", "F1", "support"], [
        [m["name"], c["label"], c["precision"], c["recall"], c["f1"], c["support"]]
        for m in doc["models"] if "error" not in m for c in m["per_class"]]


def _pairs(doc: dict) -> tuple[list[str], list[list]]:
    family = (doc.get("multiple_testing") or {}).get("family")
    header = ["A vs B", "accuracy A - B, points (95% CI)", "macro-F1 A - B, points (95% CI)",
              "only A right / only B right", "McNemar exact p", f"p after Holm ({family} tested)",
              "significant at 5% (after Holm)", "agreement"]
    rows = []
    for p in doc["pairs"]:
        if "error" in p:
            rows.append([f"{p['a']} vs {p['b']}", f"failed: {p['error']}", *[None] * 6])
            continue
        rows.append([f"{p['a']} vs {p['b']}", _diff(p["accuracy_difference"], p["accuracy_difference_ci95"]),
                     _diff(p["f1_macro_difference"], p["f1_macro_difference_ci95"]),
                     f"{p['only_a_right']} / {p['only_b_right']}", shown(p["mcnemar_exact_p"], ".4g"),
                     shown(p.get("mcnemar_p_holm"), ".4g") if defined(p["mcnemar_exact_p"]) else None,
                     ("yes" if p["significant"] else "no") if "significant" in p else None, p["agreement"]])
    return header, rows


def _slice_pair(p: dict) -> str:
    head = f"{p['a']} vs {p['b']} "
    if "error" in p:
        return head + f"failed: {p['error']}"
    if p["rows"] == 0:
        return head + "no rows"
    return head + f"{_diff(p['accuracy_difference'], p['accuracy_difference_ci95'])}, p " \
        + shown(p["mcnemar_exact_p"], ".3g")


def _slices(doc: dict) -> tuple[list[str], list[list]]:
    names = [m["name"] for m in doc["models"]]
    count = _resampled(doc.get("slice_resamples"), doc.get("bootstrap_resamples"))
    header = ["slice", "rows", *(f"{n} accuracy" for n in names),
              f"A vs B: accuracy A - B, points (95% CI{count}), p (uncorrected, exploratory)"]
    return header, [[name, None, *[None] * len(names), f"failed: {s['error']}"] if "error" in s else
                    [name, s["rows"], *(s["accuracy"][n] for n in names), "; ".join(map(_slice_pair, s["pairs"]))]
                    for name, s in doc["slices"].items()]


def _tested(p: dict, family: int | None) -> str:
    if "mcnemar_p_holm" not in p:
        return f"(McNemar p = {p['mcnemar_exact_p']:.3g}, uncorrected: the correction failed)"
    if not family or family < 2:
        return f"(McNemar p = {p['mcnemar_exact_p']:.3g})"
    return f"(McNemar p = {p['mcnemar_exact_p']:.3g}; {p['mcnemar_p_holm']:.3g} after Holm's correction over the " \
           f"{family} pairs tested)"


def verdict(doc: dict) -> list[str]:
    """One sentence per pair: which model is better at the 5% level after Holm's correction over the pairs, or
    that the rows do not show it, or why there is no test; and where the interval says otherwise, that it does."""
    label = {m["name"]: f"{m['name']} ({m['label']})" for m in doc["models"]}
    family = (doc.get("multiple_testing") or {}).get("family")
    out = []
    for p in doc["pairs"]:
        both = f"{label[p['a']]} vs {label[p['b']]}"
        if "error" in p:
            out.append(f"{both}: the statistics failed ({p['error']}); compare.json records it.")
            continue
        diff = p["accuracy_difference"]
        points = f"{100 * diff:+.2f} points" if defined(diff) else says(diff)
        if not defined(p["mcnemar_exact_p"]):
            out.append(f"{both}: {points}, not tested at the 5% level: McNemar's test is "
                       f"{says(p['mcnemar_exact_p'])}.")
        elif p.get("significant"):
            better, worse = (p["a"], p["b"]) if diff > 0 else (p["b"], p["a"])
            out.append(f"{label[better]} is more accurate than {label[worse]} by {100 * abs(diff):.2f} points: "
                       f"significant at the 5% level {_tested(p, family)}.")
        else:
            out.append(f"{both}: {points}, not significant at the 5% level {_tested(p, family)}.")
        if p.get("interval_vs_test"):
            out[-1] += f" Note: {p['interval_vs_test']}."
    return out


def _testing_line(doc: dict) -> str:
    t = doc.get("multiple_testing") or {}
    if "error" in t:
        return f"The correction for multiple testing failed ({t['error']}): the p-values above are uncorrected."
    tested = (f"{t.get('correction')}-corrected over the {t.get('family')} pairs tested (family-wise "
              f"{t.get('level', 0.05):.0%})") if t.get("family") else "no pair could be tested"
    return f"Verdicts: McNemar's exact test, {tested}. Slices: {t.get('slices')}."


def _errors(doc: dict) -> list[str]:
    return [f"Failed, recorded in compare.json (every other number stands): {e}" for e in doc.get("errors") or []]


def _rescored(doc: dict) -> list[str]:
    """Per model scored on the rows its own run reported a number for: that number beside this one, and why they
    differ (`llmkit eval`'s run_reported)."""
    return [f"{m['name']} ({m['label']}): {runs.rescored(m['run_reported'], m['accuracy'])}."
            for m in doc["models"] if "run_reported" in m and "error" not in m]


def _differences(doc: dict) -> tuple[str | None, tuple[list[str], list[list]] | None]:
    """How the models that are run exports differ in their training settings: a line, and the table where any
    setting differs (None, None where fewer than two models are run exports)."""
    found = doc.get("differences")
    if not found:
        return None, None
    if "error" in found:
        return f"How the models differ failed ({found['error']}).", None
    names = " and ".join(found["models"])
    if not found["rows"]:
        return f"{names} carry the same training settings (their training_config.yaml).", None
    label = {m["name"]: f"{m['name']} ({m['label']})" for m in doc["models"]}
    return f"The training settings in which {names} differ (their training_config.yaml; where they wrote and " \
        "logged left out):", (["setting", *(label[n] for n in found["models"])], found["rows"])


def _calibration_line(doc: dict) -> str:
    if doc["calibration_split"]:
        return f"Temperatures fitted on the {doc['calibration_split']} split."
    return f"No temperature fitted: {doc['calibration_note']}."


def markdown(doc: dict) -> str:
    lines = [f"# Comparison on {doc['split']} of {doc['data']} ({doc['rows']} rows)", ""]
    lines += [f"- {line}" for line in _errors(doc) + verdict(doc)]
    lines += ["", *md_table(*_models(doc)), _calibration_line(doc), ""]
    rescored, (said, differ) = _rescored(doc), _differences(doc)
    lines += [*(f"- {line}" for line in rescored), ""] if rescored else []
    if differ:
        lines += ["## How the models differ", "", said, "", *md_table(*differ)]
    elif said:
        lines += [said, ""]
    lines += ["## Pairs", "", *md_table(*_pairs(doc)), _testing_line(doc), "", "## Per class", "",
              *md_table(*_per_class(doc))]
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
    many = len(doc["labels"]) > 2  # each model's colours are about its own prediction: a key per row
    parts = ["<h2>Where they disagree most confidently</h2><p class='legend'>Per pair, the rows where the less sure "
             "of the two models is surest. Each model's own reasons, word by word (integrated gradients): "
             f"{explained.legend(doc['labels'], '')}</p>",
             "<table><tr><th>A vs B</th><th>gold</th><th>model</th><th>predicted (p)</th><th>text, by its "
             "attribution</th>" + ("<th>key</th>" if many else "") + "</tr>"]
    for d in doc["disagreements"]:
        for k, (name, v) in enumerate(d["predictions"].items()):
            why = v.get("explanation", {})
            text = explained.words_html(why, doc["labels"]) if "words" in why else html.escape(
                d["text"] + (f" (not explained: {why['error']})" if "error" in why else ""))
            lead = (f"<td rowspan='2'>{html.escape(d['a'])} vs {html.escape(d['b'])}</td>"
                    f"<td rowspan='2'>{html.escape(d['label'])}</td>") if k == 0 else ""
            key = (explained.row_key(why, doc["labels"]) if "words" in why else "<td></td>") if many else ""
            parts.append(f"<tr>{lead}<td>{html.escape(name)}</td><td>{html.escape(v['prediction'])} "
                         f"({v['probability']:.3f})</td><td class='why'>{text}</td>{key}</tr>")
    return "\n".join(parts + ["</table>"])


def _differences_html(doc: dict) -> str:
    said, differ = _differences(doc)
    if not said:
        return ""
    return (f"<h2>How the models differ</h2><p>{html.escape(said)}</p>" + table(*differ)) if differ else \
        f"<p>{html.escape(said)}</p>"


def page(doc: dict) -> str:
    title = f"Comparison on {doc['split']} of {doc['data']} ({doc['rows']} rows)"
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><ul class='verdict'>"
             + "".join(f"<li>{html.escape(line)}</li>" for line in _errors(doc) + verdict(doc)) + "</ul>",
             "<h2>Models</h2>" + table(*_models(doc)) + f"<p>{html.escape(_calibration_line(doc))}</p>"
             + "".join(f"<p>{html.escape(line)}</p>" for line in _rescored(doc)) + _differences_html(doc),
             "<h2>Pairs</h2>" + table(*_pairs(doc)) + f"<p>{html.escape(_testing_line(doc))}</p>",
             "<h2>Per class</h2>" + table(*_per_class(doc)),
             "<h2>Slices</h2>" + table(*_slices(doc)),
             _disagreements_html(doc), f"<p>{html.escape(NOT_SHOWN)}</p></body></html>"]
    return "\n".join(parts)


def _plain(value):
    """A numpy number that reached the document, as the Python number JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in compare's document is not JSON")


def write(doc: dict, out: Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.html into `out`: the JSON first, so that a page that fails to draw
    leaves the numbers behind."""
    paths = {kind: out / layout.COMPARE.format(kind=kind) for kind in layout.REPORT_KINDS}
    doc = finite(doc)
    paths["json"].write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=_plain) + "\n")
    paths["md"].write_text(markdown(doc))
    paths["html"].write_text(page(doc))
    return paths
