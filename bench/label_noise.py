"""Which training labels are wrong (issue 49), measured on the polarity data with 10% of the training labels flipped
at random (seeded; the flipped rows known). Each step is the shipped demo recipe (MiniLM, 2 CPU ranks, ZeRO-2, its
own epochs and batch) or an llmkit command, and appends one JSON line to bench/results/label_noise.jsonl; a step
already there is skipped, so the script can be stopped and started again (and split across sessions):

  noisy     the demo on the noisy labels, its step phases profiled (train.profile_steps): what recording the
            training dynamics costs a step (the llmkit/dynamics span), the dynamics file's size per row and epoch,
            and the in-run ranking (lowest area under the margin first, as the report's suspects table) scored
            against the flipped rows: precision and recall at k = the number flipped
  clean     the demo on the true labels (what the noise cost)
  audit     `llmkit audit` of the noisy config (--folds K): its ranking and flagged rows scored the same way
  retrained the noisy config with `data.exclude_rows` = the audit's suspects (or, --exclude inrun, the in-run
            ranking's top k)
  compare   `llmkit compare` of noisy, retrained and clean on the untouched test split (intervals, McNemar, Holm)

    .venv/bin/python bench/label_noise.py [--only noisy clean ...] [--folds 3] [--noise 0.1] [--exclude audit]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
WORK = OUT / "label_noise"
RESULTS = OUT / "label_noise.jsonl"
CONFIG = ROOT / "recipes" / "configs" / "sentiment_minilm_polarity.yaml"
STEPS = ("noisy", "clean", "audit", "retrained", "compare")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_data(noise: float, seed: int) -> tuple[Path, Path, list[int]]:
    """The clean and the noisy data folders (validation and test untouched) and the flipped rows' ids (their place
    in the train split as read: llmkit's row id)."""
    from llmkit.assets import resolve

    source = Path(resolve("asset:polarity"))
    splits = {s: _rows(source / f"{s}.jsonl") for s in ("train", "validation", "test")}
    flipped = sorted(random.Random(seed).sample(range(len(splits["train"])), round(noise * len(splits["train"]))))
    noisy = [dict(r) for r in splits["train"]]
    for i in flipped:
        noisy[i]["label"] = 1 - noisy[i]["label"]
    folders = {}
    for name, train in (("clean", splits["train"]), ("noisy", noisy)):
        folder = WORK / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("validation", splits["validation"]), ("test", splits["test"])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        folders[name] = folder
    return folders["clean"], folders["noisy"], flipped


def _run(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    began = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV).returncode
    if code:
        sys.exit(f"failed (exit {code}); see {log}")
    return round(time.perf_counter() - began, 1)


def train(name: str, data: Path, more: list[str] = ()) -> dict:
    out = WORK / name
    seconds = _run([str(ROOT / ".venv" / "bin" / "llmkit"), "train", "classification", "--config", str(CONFIG),
                    "--accelerate-config", "cpu_zero2", "--data.dataset", str(data), "--output.output_dir", str(out),
                    "--output.overwrite_output_dir", "true", "--output.explain_rows", "0", *more],
                   WORK / f"{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": seconds, "test_accuracy": metrics["test"]["accuracy"],
            "test_f1_macro": metrics["test"].get("f1_macro"), "train_rows": metrics["train"].get("rows"),
            "steps": metrics["train"]["steps"]}


def scored(order: list[int], flagged: list[int] | None, flipped: list[int]) -> dict:
    """Precision and recall at k = the number flipped for a ranking (row ids, most suspect first), and of the
    flagged set where the method flags one."""
    truth, k = set(flipped), len(flipped)
    hit = len(truth & set(order[:k]))
    got = {"k": k, "precision_at_k": round(hit / k, 4), "recall_at_k": round(hit / k, 4)}
    for at in (k // 4, k // 2):
        got[f"precision_at_{at}"] = round(len(truth & set(order[:at])) / at, 4)
    if flagged is not None:
        tp = len(truth & set(flagged))
        got.update(flagged=len(flagged), flagged_precision=round(tp / max(len(flagged), 1), 4),
                   flagged_recall=round(tp / k, 4))
    return got


def in_run_ranking(run: Path) -> tuple[list[int], dict]:
    """The report's ranking over every training row (lowest area under the margin first), the dynamics file's
    size, and the share of a profiled step that recording took."""
    from llmkit.evals import datamap
    from llmkit.rundir import dynamics
    from llmkit.rundir.layout import RunDir

    files = RunDir(run)
    records = dynamics.read(files.dynamics)
    stats = datamap.statistics(records, 2)
    order = [int(r) for r in stats.row[datamap.suspects(stats, len(stats.row))]]
    epochs = int(stats.epochs.max())
    phases = json.loads((run / "profile" / "rank0_phases.json").read_text())
    cost = {"file_bytes": files.dynamics.stat().st_size, "rows": len(stats.row), "epochs": epochs,
            "bytes_per_row_epoch": round(files.dynamics.stat().st_size / (len(stats.row) * epochs), 2),
            "mb_per_million_rows_per_epoch": round(files.dynamics.stat().st_size / (len(stats.row) * epochs), 2),
            "step_ms": phases["step_ms"], "dynamics_ms": phases.get("dynamics_ms"),
            "dynamics_share_of_step": round(phases.get("dynamics_ms", 0) / phases["step_ms"], 5)}
    return order, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--exclude", choices=["audit", "inrun"], default="audit")
    args = ap.parse_args()
    done = {json.loads(line)["step"]: json.loads(line) for line in RESULTS.read_text().splitlines()} \
        if RESULTS.is_file() else {}
    clean, noisy, flipped = write_data(args.noise, args.seed)
    record = lambda step, values: (RESULTS.open("a").write(json.dumps({"step": step, **values}) + "\n"),  # noqa: E731
                                   done.__setitem__(step, values), print(step, values, flush=True))
    common = {"noise": args.noise, "seed": args.seed, "flipped": len(flipped)}
    if "noisy" in args.only and "noisy" not in done:
        got = train("noisy", noisy, ["--train.profile_steps", "20"])
        order, cost = in_run_ranking(WORK / "noisy")
        record("noisy", {**common, **got, "dynamics": cost, "in_run": scored(order, None, flipped)})
    if "clean" in args.only and "clean" not in done:
        record("clean", {**common, **train("clean", clean)})
    if "audit" in args.only and "audit" not in done:
        seconds = _run([str(ROOT / ".venv" / "bin" / "llmkit"), "audit", "classification", "--config", str(CONFIG),
                        "--accelerate-config", "cpu_zero2", "--folds", str(args.folds), "--output",
                        str(WORK / "audit"), "--data.dataset", str(noisy), "--output.explain_rows", "0"],
                       WORK / "audit.log")
        ranking = _rows(WORK / "audit" / "ranking.jsonl")
        order, flagged = [r["row"] for r in ranking], [r["row"] for r in ranking if r["flagged"]]
        summary = json.loads((WORK / "audit" / "audit.json").read_text())
        record("audit", {**common, "seconds": seconds, "folds": args.folds, "audit": scored(order, flagged, flipped),
                         "out_of_sample_accuracy": summary["out_of_sample_accuracy"]})
    if "retrained" in args.only and "retrained" not in done:
        if args.exclude == "audit":
            exclude = WORK / "audit" / "suspects.jsonl"
        else:
            exclude = WORK / "inrun_top_k.txt"
            exclude.write_text("".join(f"{r}\n" for r in in_run_ranking(WORK / "noisy")[0][:len(flipped)]))
        excluded = [int(x) for x in exclude.read_text().split()] if exclude.suffix == ".txt" \
            else [r["row"] for r in _rows(exclude)]
        got = train("retrained", noisy, ["--data.exclude_rows", str(exclude)])
        record("retrained", {**common, **got, "excluded_by": args.exclude, "excluded": len(excluded),
                             "excluded_flipped": len(set(excluded) & set(flipped))})
    if "compare" in args.only and "compare" not in done:
        finals = [str(WORK / name / "final") for name in ("noisy", "retrained", "clean")]
        seconds = _run([str(ROOT / ".venv" / "bin" / "llmkit"), "compare", *finals, "--data", str(clean), "--split",
                        "test", "--output", str(WORK / "compare"), "--overwrite", "--explain-rows", "0"],
                       WORK / "compare.log")
        doc = json.loads((WORK / "compare" / "compare.json").read_text())
        record("compare", {**common, "seconds": seconds, "models": ["noisy", "retrained", "clean"],
                           "pairs": doc["pairs"], "per_model": doc.get("models")})
    accuracy = {s: done[s]["test_accuracy"] for s in ("noisy", "clean", "retrained") if s in done}
    if len(accuracy) == 3:
        cost = accuracy["clean"] - accuracy["noisy"]
        print(f"recovered: {(accuracy['retrained'] - accuracy['noisy']) / cost:.2f} of the {cost:.4f} the noise cost"
              if cost > 0 else f"the noise cost nothing here: {accuracy}")


if __name__ == "__main__":
    main()
