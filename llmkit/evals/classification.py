"""Classifier evaluation: logits of a whole split gathered from every rank, metrics through the shipped
`evaluate` modules, and the prediction files the report is built from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmkit.evals.gather import gather_split
from llmkit.metrics import classification_metrics


def predict(accelerator, model, loader) -> dict[str, np.ndarray]:
    """Logits, labels, rows and per-row loss for a whole split, gathered from every rank without duplicates."""
    def score(batch: dict) -> dict:
        row = batch.pop("row")
        out = model(**batch)
        return {"logits": out.logits.float(), "labels": batch["labels"], "row": row,
                "loss": out.loss.detach().float().repeat(len(row))}

    return gather_split(accelerator, model, loader, score)


def score_split(run, model, loader, num_labels: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics of one split through the shipped `evaluate` modules; 1 rank and N ranks agree exactly."""
    out = predict(run.accelerator, model, loader)
    preds = out["logits"].argmax(-1)
    metrics = classification_metrics(preds.tolist(), out["labels"].tolist(), num_labels)
    metrics["loss"] = float(out["loss"].mean())
    metrics["samples"] = int(len(preds))
    return metrics, out


def write_predictions(path: Path, rows, out: dict[str, np.ndarray], label_names: list[str], text_column: str,
                      text_pair_column: str | None = None, keep: tuple[str, ...] = ()) -> None:
    """One JSON line per row: text (and text pair), gold and predicted label, class probabilities (and the
    `keep` columns of the data, under "columns")."""
    probs = torch.softmax(torch.from_numpy(out["logits"]), dim=-1).numpy()
    order = np.argsort(out["row"])
    with open(path, "w") as fh:
        for i in order:
            row = int(out["row"][i])
            gold, pred = int(out["labels"][i]), int(out["logits"][i].argmax())
            fh.write(json.dumps({
                "row": row, "text": rows[row][text_column],
                **({"text_pair": rows[row][text_pair_column]} if text_pair_column else {}), "label": label_names[gold],
                "prediction": label_names[pred], "probabilities": [round(float(p), 6) for p in probs[i]],
                **({"columns": {c: rows[row][c] for c in keep}} if keep else {}),
            }, ensure_ascii=False, default=str) + "\n")
