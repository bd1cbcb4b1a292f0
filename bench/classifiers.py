"""Sentiment classifiers at the same data and step budget (issue 17): each variant is the shipped recipe run with
`accelerate launch` on 2 ranks, ZeRO-2, with only the step budget, the batch size and the data folder overridden.

  a    the MiniLM demo (recipes/classification.py, sentiment_minilm_polarity.yaml)
  b    SmolLM2 as a sequence classifier with LoRA (sentiment_smollm2_cls_lora.yaml)
  c    SmolLM2 label-word LoRA (recipes/causal_lm.py, sentiment_smollm2_lora.yaml)
  d0   b on the train split subsampled to 90/10 positive/negative, unweighted
  d    d0 with train.class_weights balanced

All read one data folder written here from the polarity asset: the train split (or its 90/10 subsample), the
first --val-rows of validation (scored once, at the end; not in the table) and the whole test split. Reported:
test accuracy and macro-F1 from each run's metrics.json, macro-F1 on a 90/10 positive/negative subsample of the
test predictions (the imbalance the d runs were trained on), and the run's own training seconds (optimizer
steps only). Goals: b at least as accurate as c in no more time; d above d0 on macro-F1.

    .venv/bin/python bench/classifiers.py [--steps 120] [--batch 8] [--only b c] [--val-rows 200]
        [--test-rows N] [--reuse] [--set train.learning_rate 1e-3 ...]

Writes bench/results/classifiers.json; the runs are in bench/results/classifiers/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
OUT = ROOT / "bench" / "results"
VARIANTS = {  # name: (recipe, config, data folder, extra overrides)
    "a": ("classification", "sentiment_minilm_polarity.yaml", "balanced", []),
    "b": ("classification", "sentiment_smollm2_cls_lora.yaml", "balanced", []),
    "c": ("causal_lm", "sentiment_smollm2_lora.yaml", "balanced", []),
    "d0": ("classification", "sentiment_smollm2_cls_lora.yaml", "imbalanced", []),
    "d": ("classification", "sentiment_smollm2_cls_lora.yaml", "imbalanced", ["--train.class_weights", "balanced"]),
}
WHAT = {"a": "MiniLM demo (full fine-tune)", "b": "SmolLM2 sequence classifier, LoRA",
        "c": "SmolLM2 label words, LoRA", "d0": "b on 90/10 train, unweighted", "d": "b on 90/10 train, balanced"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ninety_ten(rows: list[dict], seed: int) -> list[dict]:
    """Every positive row and a ninth as many negative ones (rows keep their file order); labels are the asset's
    ids (1 positive) or, in predictions files, the names."""
    pos = [i for i, r in enumerate(rows) if r["label"] in (1, "positive")]
    neg = [i for i, r in enumerate(rows) if r["label"] in (0, "negative")]
    keep = set(pos) | set(random.Random(seed).sample(neg, min(len(neg), len(pos) // 9)))
    return [r for i, r in enumerate(rows) if i in keep]


def write_data(val_rows: int, test_rows: int | None) -> dict[str, Path]:
    """The two data folders every variant reads (the polarity asset's standard split)."""
    from llmkit.assets import resolve

    source = Path(resolve("asset:polarity"))
    train, val, test = (_rows(source / f"{s}.jsonl") for s in ("train", "validation", "test"))
    assert {r["label"] for r in train} == {0, 1}, "the asset's labels changed (0 negative, 1 positive)"
    folders = {}
    for name, rows in (("balanced", train), ("imbalanced", _ninety_ten(train, seed=0))):
        folder = OUT / "classifiers" / "data" / name
        _write(folder / "train.jsonl", rows)
        _write(folder / "validation.jsonl", val[:val_rows])
        _write(folder / "test.jsonl", random.Random(0).sample(test, test_rows) if test_rows else test)
        folders[name] = folder
    return folders


def macro_f1(rows: list[dict]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score([r["label"] for r in rows], [r["prediction"] for r in rows], average="macro"))


def run(name: str, folder: Path, steps: int, batch: int, reuse: bool = False, more: list[str] = ()) -> dict:
    recipe, config, _, extra = VARIANTS[name]
    extra = [*extra, *more]
    tag = "".join(c if c.isalnum() or c in ".-" else "_" for c in "_".join(more).replace("--", ""))
    out = OUT / "classifiers" / (f"{name}-{tag}" if more else name)  # an override run keeps its own folder
    done = out / "metrics.json"
    if reuse and done.is_file() and json.loads(done.read_text())["train"]["steps"] == steps:
        print(f"{name}: reusing the finished run in {out}", flush=True)
        return _result(name, folder, out)
    cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_zero2.yaml"), str(ROOT / "recipes" / f"{recipe}.py"),
           "--config", str(CONFIGS / config), "--data.dataset", str(folder), "--train.max_steps", str(steps),
           "--train.per_device_batch_size", str(batch), "--output.output_dir", str(out),
           "--output.overwrite_output_dir", "true", *extra]
    print("$ " + " ".join(cmd), flush=True)
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {log}")
    return _result(name, folder, out)


def _result(name: str, folder: Path, out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    preds = _rows(out / "predictions_test.jsonl")
    test = metrics["test"]
    return {"variant": name, "what": WHAT[name], "steps": metrics["train"]["steps"],
            "train_rows": len(_rows(folder / "train.jsonl")), "test_rows": len(preds),
            "test_accuracy": test["accuracy"],
            "test_f1_macro": macro_f1(preds), "test_f1_macro_reported": test.get("f1_macro"),
            "test_90_10_f1_macro": macro_f1(_ninety_ten(preds, seed=1)),
            "train_seconds": metrics["train"]["step_seconds"],
            "class_weights": metrics["train"].get("class_weights")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8, help="rows per rank per step, every variant")
    ap.add_argument("--val-rows", type=int, default=200)
    ap.add_argument("--test-rows", type=int, default=None, help="a smaller test split, for a quick try")
    ap.add_argument("--reuse", action="store_true", help="read the variants already run at these steps")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="a config override for every variant run, e.g. --set train.learning_rate 1e-3")
    args = ap.parse_args()
    more = [x for key, value in args.set for x in (f"--{key}", value)]
    folders = write_data(args.val_rows, args.test_rows)
    results = [run(name, folders[VARIANTS[name][2]], args.steps, args.batch, args.reuse, more)
               for name in args.only]
    print(f"\n{args.steps} steps x {args.batch} rows x 2 ranks, ZeRO-2; test split {results[0]['test_rows']} rows")
    print(f"{'':3} {'variant':34} {'train rows':>10} {'test acc':>8} {'macro-F1':>8} {'90/10 F1':>8} {'train s':>8}")
    for r in results:
        print(f"{r['variant']:3} {r['what']:34} {r['train_rows']:>10} {r['test_accuracy']:>8.4f} "
              f"{r['test_f1_macro']:>8.4f} {r['test_90_10_f1_macro']:>8.4f} {r['train_seconds']:>8.1f}")
    by = {r["variant"]: r for r in results}
    if {"b", "c"} <= by.keys():
        b, c = by["b"], by["c"]
        met = b["test_accuracy"] >= c["test_accuracy"] and b["train_seconds"] <= c["train_seconds"]
        print(f"b vs c: accuracy {b['test_accuracy'] - c['test_accuracy']:+.4f}, "
              f"time x{b['train_seconds'] / c['train_seconds']:.2f} -> {'met' if met else 'not met'}")
    if {"d", "d0"} <= by.keys():
        d, d0 = by["d"], by["d0"]
        print(f"d vs d0: macro-F1 {d['test_f1_macro'] - d0['test_f1_macro']:+.4f} (90/10 test "
              f"{d['test_90_10_f1_macro'] - d0['test_90_10_f1_macro']:+.4f}) -> "
              f"{'met' if d['test_f1_macro'] > d0['test_f1_macro'] else 'not met'}")
    OUT.mkdir(exist_ok=True)
    (OUT / "classifiers.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
