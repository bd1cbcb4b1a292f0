"""What the report's explanations cost on the demo's model (issue 22): the MiniLM asset as a 2-label classifier,
explaining rows of the polarity test split the way a run's report does (`output.explain_rows`), in the same fresh
process (model load included). The weights' values do not change the cost, so an untrained head is enough.

    .venv/bin/python bench/explain.py [--rows 8 32]

Writes bench/results/explain.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llmkit import assets
from llmkit.evals import explain
from llmkit.rundir.layout import RunDir

OUT = Path(__file__).resolve().parents[1] / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    test = Path(assets.resolve("asset:polarity")) / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        names = ["negative", "positive"]
        model = AutoModelForSequenceClassification.from_pretrained(
            assets.resolve("asset:minilm"), num_labels=2, id2label=dict(enumerate(names)))
        tokenizer = AutoTokenizer.from_pretrained(assets.resolve("asset:minilm"))
        model.save_pretrained(run / "final")
        tokenizer.save_pretrained(run / "final")
        model.eval()
        # predictions as a run writes them: this model's own, on 200 test rows
        with open(run / "predictions_test.jsonl", "w") as fh, torch.no_grad():
            for i, r in enumerate(rows[:200]):
                probs = model(**tokenizer(r["text"], return_tensors="pt")).logits[0].softmax(-1).tolist()
                fh.write(json.dumps({"row": i, "text": r["text"], "label": names[int(r["label"])],
                                     "prediction": names[probs.index(max(probs))], "probabilities": probs}) + "\n")
        for count in args.rows:
            began = time.perf_counter()
            doc = explain.for_run(RunDir(run), "test", count, seed=42)
            results.append({"rows": count, "seconds_in_process": doc["seconds"],
                            "seconds_with_process_start": round(time.perf_counter() - began, 2),
                            "worst_delta": max(max(r["delta"].values()) for r in doc["rows"]),
                            "words": sum(len(r["words"]) for r in doc["rows"])})
            print(results[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "explain.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
