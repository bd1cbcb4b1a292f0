"""The data map of a classification run's training rows, from the training dynamics the run recorded
(llmkit.rundir.dynamics): per row its confidence and variability across epochs (Swayamdipta et al. 2020, "Dataset
Cartography"), its correctness, and its area under the margin (Pleiss et al. 2020, "Identifying Mislabeled Data
using the Area Under the Margin Ranking"); the map's regions and the rows most likely mislabeled. Rank 0 writes
it after training as data_map.json, with the suspects' texts; the report shows it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from llmkit.data.sources import ROW_ID_KEY
from llmkit.rundir import dynamics as stored
from llmkit.rundir.layout import RunDir, write_durably

SUSPECTS = 20  # rows in the report's table of likely mislabeled rows: as many as a reader checks by eye
POINTS = 20_000  # rows drawn on the map at most (a seeded sample); every row counts in the numbers
AMBIGUOUS_SHARE = 1 / 3  # Swayamdipta et al. take the third of rows that vary most as the ambiguous ones
AMBIGUOUS_FLOOR = 0.1  # ... but a probability that moves less across epochs is not ambiguous, whatever the share
CONFIDENT = 0.5  # outside the ambiguous third: easy-to-learn from this mean given-label probability up
REGIONS = ("easy-to-learn", "ambiguous", "hard-to-learn")


@dataclass
class RowStats:
    """One entry per recorded training row, in row-id order."""
    row: np.ndarray  # the row's id (its row in the train split as read)
    label: np.ndarray  # its given label's id
    epochs: np.ndarray  # epochs it was recorded in
    confidence: np.ndarray  # mean probability of the given label across epochs
    variability: np.ndarray  # their standard deviation; NaN for a row of one epoch (it needs several)
    correctness: np.ndarray  # share of its epochs in which the given label was scored highest
    aum: np.ndarray  # area under the margin: the mean of (given label's score - largest other score)
    preferred: np.ndarray  # the label the model predicted in most epochs (ties: the later epoch's)


def statistics(records: np.ndarray, num_labels: int) -> RowStats:
    """Per-row statistics of the dynamics records (llmkit.rundir.dynamics.RECORD)."""
    r = records[np.lexsort((records["epoch"], records["row"]))]
    rows, first, counts = np.unique(r["row"], return_index=True, return_counts=True)
    owner = np.repeat(np.arange(len(rows)), counts)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, values.astype(np.float64), minlength=len(rows)) / counts

    # Swayamdipta et al.: confidence = mean gold probability over epochs, variability = its (population) std
    confidence = mean(r["gold_prob"])
    spread = np.sqrt(mean((r["gold_prob"] - confidence[owner]) ** 2))
    variability = np.where(counts > 1, spread, np.nan)
    votes = np.zeros((len(rows), num_labels))
    np.add.at(votes, (owner, r["predicted"]), 1.0)
    votes[np.arange(len(rows)), r["predicted"][first + counts - 1]] += 0.5  # a tie goes to the latest epoch
    return RowStats(row=rows, label=r["label"][first], epochs=counts, confidence=confidence,
                    variability=variability, correctness=mean(r["predicted"] == r["label"]),
                    aum=mean(r["margin"]),  # Pleiss et al.: the margin averaged over the epochs a row is trained
                    preferred=votes.argmax(1))


def regions(stats: RowStats) -> tuple[np.ndarray, float | None]:
    """Each row's region (an index into REGIONS) and the variability from which a row is ambiguous (None where
    no row has several epochs). Ambiguous: the third of rows whose given-label probability varies most, if it
    varies by AMBIGUOUS_FLOOR or more; the others are easy-to-learn from a mean probability of CONFIDENT up,
    hard-to-learn below."""
    region = np.where(stats.confidence >= CONFIDENT, 0, 2)
    measured = ~np.isnan(stats.variability)
    if not measured.any():
        return region, None
    cut = max(float(np.quantile(stats.variability[measured], 1 - AMBIGUOUS_SHARE)), AMBIGUOUS_FLOOR)
    ambiguous = measured & (np.nan_to_num(stats.variability) >= cut)
    return np.where(ambiguous, 1, region), cut


def suspects(stats: RowStats, n: int = SUSPECTS) -> np.ndarray:
    """Indices of the rows most likely mislabeled: lowest area under the margin first (Pleiss et al.: a row whose
    given label keeps losing to another has a low, often negative, AUM); ties by lower confidence."""
    return np.lexsort((stats.confidence, stats.aum))[:n]


def _number(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def data_map(records: np.ndarray, label_names: list[str], texts, what: str | None, seed: int = 0) -> dict:
    """The data map as data_map.json holds it; `texts(row ids) -> [{"text": ..., ...}]` gives the suspects'
    texts."""
    stats = statistics(records, len(label_names))
    region, cut = regions(stats)
    top = suspects(stats)
    found = texts(stats.row[top].tolist())
    pick = np.sort(np.random.default_rng(seed).permutation(len(stats.row))[:POINTS])
    return {
        "rows": int(len(stats.row)), "records": int(len(records)), "scores": what,
        "epochs": {"most": int(stats.epochs.max()), "fewest": int(stats.epochs.min())},
        "rows_of_one_epoch": int((stats.epochs == 1).sum()),  # their variability is not measured
        "ambiguous_from_variability": _number(cut) if cut is not None else None,
        "ambiguous_floor": AMBIGUOUS_FLOOR,
        "easy_from_confidence": CONFIDENT,
        "regions": {name: int((region == i).sum()) for i, name in enumerate(REGIONS)},
        "negative_aum": int((stats.aum < 0).sum()),
        "suspects": [{"row": int(stats.row[i]), **found[k], "label": label_names[stats.label[i]],
                      "preferred": label_names[stats.preferred[i]], "aum": _number(stats.aum[i]),
                      "confidence": _number(stats.confidence[i]), "variability": _number(stats.variability[i]),
                      "correctness": _number(stats.correctness[i]), "epochs": int(stats.epochs[i])}
                     for k, i in enumerate(top)],
        "points": {"drawn": int(len(pick)), "confidence": [_number(v) for v in stats.confidence[pick]],
                   "variability": [_number(v) for v in stats.variability[pick]],
                   "correctness": [_number(v) for v in stats.correctness[pick]]},
    }


def train_texts(rows, text_column: str, text_pair_column: str | None):
    """`texts` for `data_map` from the labeled train rows (with their ids, llmkit.data.sources.ROW_ID_KEY)."""
    ids = np.asarray(rows[ROW_ID_KEY])
    order = np.argsort(ids)

    def texts(wanted: list[int]) -> list[dict]:
        at = order[np.searchsorted(ids, wanted, sorter=order)]
        return [{"text": rows[int(i)][text_column],
                 **({"text_pair": rows[int(i)][text_pair_column]} if text_pair_column else {})} for i in at]

    return texts


def write_for_run(files: RunDir, rows, label_names: list[str], text_column: str, text_pair_column: str | None,
                  what: str | None, log=print) -> bool:
    """Rank 0 after training: data_map.json from the run's training dynamics; False where it recorded none."""
    records = stored.read(files.dynamics)
    if not len(records):
        return False
    doc = data_map(records, label_names, train_texts(rows, text_column, text_pair_column), what)
    doc["train_rows"] = len(rows)  # a run of max_steps may train on some of them only
    write_durably(files.data_map, json.dumps(doc, ensure_ascii=False) + "\n")
    log(f"data map: {doc['rows']} training rows over {doc['epochs']['most']} epoch(s): "
        + ", ".join(f"{k} {v}" for k, v in doc["regions"].items())
        + f"; {doc['negative_aum']} with a negative area under the margin")
    return True
