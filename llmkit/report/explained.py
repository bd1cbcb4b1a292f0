"""The report's "Why the model said that" section, from a run's explanations.json (llmkit.evals.explain): each
explained row with its words highlighted, the convergence delta, the words that push most often toward each
label, and what it cost.

Colour: green toward the second label (positive in sentiment), red toward the first; with more than two labels,
green toward the row's predicted class, red away from it, and each row's own key names that class. The colour is
never the only cue: words pushing toward green are underlined solid and those toward red dotted, every word
carries its value on hover, and the page keeps its colours in print."""

from __future__ import annotations

import html

CSS = """.why{line-height:2.1}.why span,.key span,.legend span{border-radius:3px;-webkit-print-color-adjust:exact;
print-color-adjust:exact}.why span{padding:.1em .15em}.up{border-bottom:2px solid #1a7f37}
.down{border-bottom:2px dotted #b42318}.legend span{padding:.1em .4em;margin-right:.6em}
.key span{display:inline-block;padding:0 .3em;margin:.1em 0;white-space:nowrap}"""
UP, DOWN = "rgba(26,127,55,.5)", "rgba(180,35,24,.5)"


def contrast(row: dict, names: list[str]) -> tuple[list[float], str, str]:
    """One value per word for the colours, and what green and red mean ("pushes " + either)."""
    a = row["attributions"]
    if len(names) == 2:  # toward the second label less toward the first: the logit margin, exactly additive
        return [p - n for p, n in zip(a[names[1]], a[names[0]])], f"toward {names[1]}", f"toward {names[0]}"
    pred = row["prediction"]
    return a[pred], f"toward {pred} (the prediction)", f"away from {pred}"


def legend(names: list[str], lead: str = "pushes ") -> str:
    """The key above a table of explained rows: the two labels, or (more labels) each row's own prediction."""
    green, red = ("toward " + names[1], "toward " + names[0]) if len(names) == 2 else (
        "toward the row's predicted class", "away from it (each row's key names the class)")
    return (f"<span class='up' style='background:{UP}'>{html.escape(lead + green)}</span>"
            f"<span class='down' style='background:{DOWN}'>{html.escape(lead + red)}</span>")


def row_key(row: dict, names: list[str]) -> str:
    """A row's own key, for more than two labels (a cell beside its words): what green and red mean there."""
    green, red = contrast(row, names)[1:]
    return (f"<td class='key'><span class='up' style='background:{UP}'>{html.escape(green)}</span><br>"
            f"<span class='down' style='background:{DOWN}'>{html.escape(red)}</span></td>")


def _word(word: str, value: float, scale: float) -> str:
    alpha = min(1.0, abs(value) / scale) * 0.75 if scale > 0 else 0.0
    colour = f"rgba(26,127,55,{alpha:.2f})" if value > 0 else f"rgba(180,35,24,{alpha:.2f})"
    kind = "up" if value > 0 else "down" if value < 0 else ""
    return (f"<span class='{kind}' style='background:{colour}' title='{value:+.4f}'>{html.escape(word)}</span>")


def words_html(row: dict, names: list[str]) -> str:
    """An explained row's words as highlighted spans (the colours of `contrast`)."""
    values = contrast(row, names)[0]
    scale = max((abs(v) for v in values), default=0.0)
    spans = [_word(w, v, scale) for w, v in zip(row["words"], values)]
    if row.get("pair_from") is not None:  # a text pair: where the second text begins
        spans.insert(row["pair_from"], "<b title='the text pair begins'>&#8214;</b>")
    return " ".join(spans)


def top_words(row: dict, names: list[str], count: int = 3) -> str:
    """The row's `count` strongest words with their values (the Markdown pages' stand-in for the colours)."""
    values = contrast(row, names)[0]
    return ", ".join(f"{w} ({v:+.2f})" for v, w in sorted(zip(values, row["words"]), key=lambda t: -abs(t[0]))[:count])


def _marks(row: dict, doc: dict) -> str:
    """A mistake; a row the explaining model (fp32, CPU) predicts otherwise than the run did (a near tie); a row
    whose integral did not converge even at the bound of its steps."""
    mark = "" if row["prediction"] == row["label"] else " (mistake)"
    run = row.get("run_prediction", row["prediction"])
    mark += "" if run == row["prediction"] else f" (the run: {run})"
    if row.get("converged", True):
        return mark
    if "steps" not in row:  # explanations.json of an llmkit that did not raise the steps
        return mark + " (delta large: explain it with more steps)"
    return mark + f" (delta over {doc.get('tolerance', 0.05):.0%} even at {row['steps']} steps, the bound)"


def _delta(row: dict, doc: dict) -> str:
    """The row's largest delta, and its steps where they were raised."""
    steps = row.get("steps", doc["steps"])
    return f"{max(row['delta'].values()):.1e}" + (f" ({steps} steps)" if steps != doc["steps"] else "")


def _steps(doc: dict) -> str:
    """How many steps (evals.explain.steps_note, written beside the rows)."""
    return doc.get("steps_note") or f"{doc['steps']} steps"


def html_section(doc: dict, names: list[str]) -> str:
    rows = doc["rows"]
    if not rows:
        return ""
    many = len(names) > 2  # each row's colours are about its own prediction: a key per row
    parts = [f"<h3>Why the model said that ({html.escape(doc['split'])}, {len(rows)} rows)</h3>",
             "<p class='legend'>Integrated gradients on the word embeddings (Captum, "
             f"{html.escape(_steps(doc))}; baseline: {html.escape(doc['baseline'])}); {doc['seconds']:.1f} s for "
             f"these rows. {legend(names)} (stronger colour: larger attribution; hover a word for its value)</p>",
             "<table><tr><th>text, by attribution</th>" + ("<th>key</th>" if many else "")
             + "<th>gold</th><th>predicted</th><th>p</th><th>delta</th></tr>"]
    for row in rows:
        parts.append(f"<tr><td class='why'>{words_html(row, names)}</td>{row_key(row, names) if many else ''}"
                     f"<td>{html.escape(row['label'])}</td>"
                     f"<td>{html.escape(row['prediction'] + _marks(row, doc))}</td>"
                     f"<td>{max(row['probabilities']):.3f}</td><td>{_delta(row, doc)}</td></tr>")
    parts.append("</table>")
    parts.append("<table><tr><th>label</th><th>words most often among a row's strongest pushes toward it</th></tr>"
                 + "".join(f"<tr><td>{html.escape(label)}</td><td>"
                           + html.escape(", ".join(f"{w} ({n})" for w, n in words)) + "</td></tr>"
                           for label, words in doc["summary"].items()) + "</table>")
    return "\n".join(parts)


def md_section(doc: dict, names: list[str]) -> list[str]:
    rows = doc["rows"]
    if not rows:
        return []
    toward = (f"toward {names[1]} (+) and toward {names[0]} (-)" if len(names) == 2 else
              "toward the row's predicted class (+) and away from it (-)")
    lines = [f"### Why the model said that ({doc['split']}, {len(rows)} rows, {doc['seconds']:.1f} s)", "",
             f"Top words {toward}, integrated gradients ({_steps(doc)}).", "",
             "| text | gold | predicted | strongest words | delta |", "|---|---|---|---|---|"]
    for row in rows:
        words = top_words(row, names)
        if len(names) > 2:
            words = f"toward {row['prediction']}: {words}"
        text = row["text"] + (f" // {row['text_pair']}" if "text_pair" in row else "")
        lines.append(f"| {text.replace('|', '/')} | {row['label']} | {row['prediction']}{_marks(row, doc)} | "
                     f"{words.replace('|', '/')} | {_delta(row, doc)} |")
    return lines
