"""The report's "Training data map" section, from a run's data_map.json (llmkit.evals.datamap): what the map
shows and what it could not measure, its regions, and the training rows most likely mislabeled."""

from __future__ import annotations

import html

SUSPECT_HEADER = ["row", "text", "given label", "model prefers", "AUM", "confidence", "variability", "right in"]


def _shown(value) -> str:
    return "not measured (1 epoch)" if value is None else f"{value:.4f}"


def notes(doc: dict) -> list[str]:
    """The section's sentences: what was recorded, how to read it, and what a short run cannot measure."""
    epochs = doc["epochs"]["most"]
    said = [f"{doc['rows']} of {doc.get('train_rows') or doc['rows']} training rows recorded over {epochs} epoch(s), "
            f"each from the training step's own forward ({doc['scores']}). Confidence is the mean probability of a "
            "row's given label across epochs, variability its standard deviation (Swayamdipta et al. 2020, "
            "\"Dataset Cartography\"); the area under the margin (AUM) is the mean of the given label's score less "
            "the largest other one (Pleiss et al. 2020): a row whose given label keeps losing to another has a "
            "low, often negative, AUM and is the first to check for a wrong label."]
    if epochs == 1:
        said.append("Variability is not measured: each row was trained in one epoch, and variability needs several "
                    "(train.epochs 2 or more). The regions use confidence alone, and no row can be called ambiguous.")
    elif doc["rows_of_one_epoch"]:
        said.append(f"Rows trained in one epoch only (the run stopped within an epoch): {doc['rows_of_one_epoch']}; "
                    "their variability is not measured and their region is by confidence alone.")
    cut = doc.get("ambiguous_from_variability")
    rule = (f"ambiguous: variability {cut:.4f} or more (the third of rows whose probability varies most, and "
            f"never under {doc.get('ambiguous_floor', 0):g}); of the others, " if cut is not None else "")
    counts = ", ".join(f"{name} {n}" for name, n in doc["regions"].items())
    said.append(f"Regions: {rule}easy-to-learn from a mean probability of {doc['easy_from_confidence']:g}, "
                f"hard-to-learn below. {counts}. {doc['negative_aum']} rows have a negative AUM (the model prefers "
                "another label on average).")
    return said


def suspect_rows(doc: dict) -> list[list[str]]:
    """The suspects table's cells, lowest AUM first."""
    return [[str(s["row"]), s["text"] + (f" // {s['text_pair']}" if "text_pair" in s else ""), s["label"],
             s["preferred"], f"{s['aum']:.4f}", f"{s['confidence']:.4f}", _shown(s["variability"]),
             f"{round(s['correctness'] * s['epochs'])} of {s['epochs']} epochs"] for s in doc["suspects"]]


def _title(doc: dict) -> str:
    return f"Training rows most likely mislabeled (lowest AUM first, {len(doc['suspects'])})"


def html_section(doc: dict, image: str) -> str:
    """The section for report.html; `image` is the map's <img> tag."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in SUSPECT_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row in suspect_rows(doc))
    return ("<h3>Training data map</h3>" + "".join(f"<p>{html.escape(s)}</p>" for s in notes(doc)) + image
            + f"<h3>{html.escape(_title(doc))}</h3><table class='suspects'><tr>{head}</tr>{body}</table>")


def md_section(doc: dict) -> list[str]:
    """The section for report.md (the map itself is on the HTML page)."""
    lines = ["### Training data map", ""]
    for said in notes(doc):
        lines += [said, ""]
    lines += [f"#### {_title(doc)}", "", "| " + " | ".join(SUSPECT_HEADER) + " |", "|" + "---|" * len(SUSPECT_HEADER)]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in row) + " |" for row in suspect_rows(doc)]
    return lines
