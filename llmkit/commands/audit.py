"""`llmkit audit`: which training labels are likely wrong, from out-of-sample probabilities. The run's own config is
trained K times (K-fold cross-validation over the train split, stratified by label, each fold a real launch with
the user's launcher, ranks and DeepSpeed settings), each fold's model scores the rows it never saw (`llmkit eval`,
so every kind of classifier is scored as everywhere else), and cleanlab's confident learning
(`find_label_issues`, Northcutt et al. 2021) flags the rows whose given label the out-of-sample probabilities
contradict. That is the stronger, paid-for counterpart of the data map every run records in passing (its
probabilities are in-sample).

The output folder: `suspects.jsonl` (the flagged rows, worst first, each with its row id, text, given and suggested
label and scores: a file `data.exclude_rows` takes as it is, after review), `ranking.jsonl` (every audited row,
worst first), `audit.json` and `audit.md`, and `fold-<k>/` (the fold's run and its scored rows). A stopped audit
run again with the same arguments keeps the folds already done."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmkit import shipped
from llmkit.commands import compare, launcher
from llmkit.commands.check_numerics import QUIET
from llmkit.config import load_config
from llmkit.data import sources
from llmkit.errors import USER_ERROR, LlmkitError
from llmkit.rundir import outputs
from llmkit.rundir.layout import RunDir, write_durably

AUDIT, SUSPECTS, RANKING, NOTES = "audit.json", "suspects.jsonl", "ranking.jsonl", "audit.md"
PLAN = "plan.json"  # what the audit was asked (written first): a rerun goes on only with the same
OWNS = (PLAN, AUDIT, SUSPECTS, RANKING, NOTES, "fold-*")
SHOWN = 20  # suspects in audit.md and the printed summary
HELD_OUT_SPLIT = "test"  # the name the held-out rows are scored under (a data folder's split file)


def folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Positions of each fold's held-out rows: stratified by label, seeded, every row in exactly one fold."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    if k < 2:
        raise LlmkitError(f"--folds {k}: cross-validation needs at least 2 folds")
    if counts[counts > 0].min() < k:
        raise LlmkitError(f"--folds {k}: a label has only {counts[counts > 0].min()} training rows, fewer than the "
                          "folds; lower --folds (each fold holds out some rows of every label)")
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [held for _, held in split.split(np.zeros(len(labels)), labels)]


def _audited(cfg) -> dict:
    """The training rows exactly as the run reads them (its exclusions and max_train_samples applied)."""
    labeled = sources.load_labeled(cfg.data, seed=cfg.train.seed, log=lambda _: None)
    train = labeled.rows["train"]
    d = cfg.data
    return {"row": np.array(train[sources.ROW_ID_KEY]), "label": np.array(train["labels"]),
            "text": train[d.text_column], "pair": train[d.text_pair_column] if d.text_pair_column else None,
            "names": labeled.label_names}


def _write_held_out(rows: dict, held: np.ndarray, folder: Path, cfg) -> Path:
    """The fold's held-out rows as a data folder `llmkit eval` reads with the run's own column names."""
    d = cfg.data
    data = folder / "held_out"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / f"{HELD_OUT_SPLIT}.jsonl", "w", encoding="utf-8") as fh:
        for i in held:
            row = {d.text_column: rows["text"][i], d.label_column: rows["names"][rows["label"][i]]}
            if rows["pair"] is not None:
                row[d.text_pair_column] = rows["pair"][i]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return data


def _train_fold(args: argparse.Namespace, accelerate: Path, folder: Path, excluded: list[int]) -> None:
    """The run's config trained without the fold's rows: `llmkit train` with the user's launcher settings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exclude_rows.txt").write_text("".join(f"{r}\n" for r in excluded))
    forced = ["--data.exclude_rows", str(folder / "exclude_rows.txt"), "--data.max_train_samples", "null",
              "--data.test_split", "null", "--output.output_dir", str(folder / "run"),
              "--output.overwrite_output_dir", "true", "--output.push_to_hub", "false",
              "--checkpoint.resume_from", "null", "--train.report_to", "none"]
    cmd = launcher.train_argv(args, accelerate)
    code = subprocess.run([*cmd, *QUIET, *args.overrides, *forced]).returncode
    if code == USER_ERROR:
        sys.exit(USER_ERROR)  # the run said its one line
    if code != 0:
        raise LlmkitError(f"the run of {folder.name} failed (exit {code}); its folder is {folder / 'run'}. Run "
                          "`llmkit audit` again with the same arguments to go on from this fold")


def _fold_probabilities(args, accelerate: Path, out: Path, rows: dict, held: np.ndarray, k: int, cfg) -> np.ndarray:
    """Out-of-sample probabilities of the fold's held-out rows (in label order), training the fold unless a
    stopped audit already did."""
    folder = out / f"fold-{k}"
    scored_dir = folder / "scored"
    if not RunDir(folder / "run").metrics.is_file():
        held_rows = set(rows["row"][held].tolist())
        train_rows = [int(r) for r in rows["row"] if int(r) not in held_rows]
        excluded = sorted(set(range(max(rows["row"]) + 1)) - set(train_rows))
        print(f"audit: fold {k + 1} of {args.folds}: training on {len(train_rows)} rows, holding out {len(held)}",
              flush=True)
        _train_fold(args, accelerate, folder, excluded)
    source = _write_held_out(rows, held, folder, cfg)
    got = compare.score(str(RunDir(folder / "run").final.root), scored_dir, str(source), [HELD_OUT_SPLIT],
                        ["--overwrite"], [])
    order = [got["labels"].index(name) for name in rows["names"]]
    return got[HELD_OUT_SPLIT]["probs"][:, order]


def rank(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cleanlab's confident learning on out-of-sample probabilities: the flagged positions, worst first; every
    row's label quality (self-confidence: the probability of its given label); every row's order, worst first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return np.asarray(flagged, dtype=int), quality, np.argsort(quality, kind="stable")


def _row(rows: dict, probs: np.ndarray, quality: np.ndarray, i: int, flagged: bool) -> dict:
    names = rows["names"]
    entry = {"row": int(rows["row"][i]), "text": rows["text"][i]}
    if rows["pair"] is not None:
        entry["text_pair"] = rows["pair"][i]
    entry.update(label=names[rows["label"][i]], suggested=names[int(np.argmax(probs[i]))],
                 label_quality=round(float(quality[i]), 6), flagged=flagged,
                 probabilities={n: round(float(p), 6) for n, p in zip(names, probs[i])})
    return entry


def _write(out: Path, rows: dict, probs: np.ndarray, summary: dict) -> list[dict]:
    flagged, quality, order = rank(rows["label"], probs)
    marked = set(flagged.tolist())
    suspects = [_row(rows, probs, quality, i, True) for i in flagged]
    ranking = [_row(rows, probs, quality, i, i in marked) for i in order]
    for name, entries in ((SUSPECTS, suspects), (RANKING, ranking)):
        write_durably(out / name, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    predicted = probs.argmax(1)
    summary.update(rows=len(probs), flagged=len(suspects), flagged_share=round(len(suspects) / len(probs), 4),
                   out_of_sample_accuracy=round(float((predicted == rows["label"]).mean()), 4),
                   flagged_by_label={n: int((rows["label"][flagged] == j).sum()) for j, n in enumerate(rows["names"])})
    write_durably(out / AUDIT, json.dumps(summary, indent=1) + "\n")
    write_durably(out / NOTES, notes(summary, suspects))
    return suspects


def notes(summary: dict, suspects: list[dict]) -> str:
    """audit.md: what was done, the most likely mislabeled rows, and how to act on them."""
    lines = [f"# Label audit of {summary['config']}", "",
             f"{summary['rows']} training rows, {summary['folds']}-fold cross-validation of the run's config "
             f"({summary['recipe']}); out-of-sample accuracy {summary['out_of_sample_accuracy']:.4f}. cleanlab's "
             f"`find_label_issues` (prune by noise rate) flags {summary['flagged']} rows "
             f"({100 * summary['flagged_share']:.1f}%), worst first by the probability of the given label.", "",
             "| row | given | suggested | p(given) | text |", "|---:|---|---|---:|---|"]
    for s in suspects[:SHOWN]:
        text = s["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['row']} | {s['label']} | {s['suggested']} | {s['label_quality']:.3f} | "
                     f"{text[:160]}{'...' if len(text) > 160 else ''} |")
    lines += ["", f"Review {SUSPECTS} (delete the lines of rows whose label is right), then retrain with "
              f"`--data.exclude_rows {SUSPECTS}` and compare the two models on a test split nobody edited: "
              "`llmkit compare <run>/final <retrained>/final --data <data> --split test`.", ""]
    return "\n".join(lines)


def _start(args: argparse.Namespace, out: Path, plan: dict) -> None:
    """A new folder, this audit's own (its folds done so far kept), or with --overwrite an earlier audit's, cleared."""
    outputs.check(out, "llmkit audit", (out / PLAN).is_file(), OWNS, overwrite=True)
    if args.overwrite:
        for entry in out.iterdir() if out.is_dir() else []:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif (out / PLAN).is_file() and json.loads((out / PLAN).read_text()) != plan:
        raise LlmkitError(f"--output {out} holds an audit asked with other settings (its {PLAN}); use the same "
                          "arguments to go on with it, --overwrite to start it again, or pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_durably(out / PLAN, json.dumps(plan, indent=1) + "\n")


def main(args: argparse.Namespace) -> None:
    """`llmkit audit RECIPE --config C --accelerate-config A [--folds K] [--output DIR] [--section.key v]`."""
    began = time.perf_counter()
    out = args.output
    accelerate = shipped.find(args.accelerate_config, "accelerate", "--accelerate-config")
    cfg = load_config(args.config, args.overrides)  # a bad config stops here, before any fold is trained
    if args.recipe == "causal_lm" and not cfg.data.prompt_template:
        raise LlmkitError("llmkit audit checks a classifier's labels: a causal_lm config needs data.prompt_template "
                          "and label words (label-word classification)")
    rows = _audited(cfg)
    held_out = folds(rows["label"], args.folds, cfg.train.seed)
    digest = hashlib.sha256(rows["row"].tobytes() + rows["label"].astype(np.int64).tobytes()).hexdigest()
    _start(args, out, {"recipe": args.recipe, "config": str(args.config), "accelerate_config": str(accelerate),
                       "folds": args.folds, "overrides": args.overrides, "rows": digest})
    probs = np.zeros((len(rows["label"]), len(rows["names"])))
    for k, held in enumerate(held_out):
        probs[held] = _fold_probabilities(args, accelerate, out, rows, held, k, cfg)
    summary = {"config": str(args.config), "recipe": args.recipe, "folds": args.folds, "seed": cfg.train.seed,
               "labels": rows["names"], "method": "cleanlab.filter.find_label_issues(filter_by='prune_by_noise_rate')"
               " on out-of-sample probabilities from stratified K-fold cross-validation",
               "overrides": args.overrides, "seconds": round(time.perf_counter() - began, 1)}
    suspects = _write(out, rows, probs, summary)
    for s in suspects[:5]:
        print(f"audit: row {s['row']}: given {s['label']}, suggested {s['suggested']} (p(given) "
              f"{s['label_quality']:.3f}): {s['text'][:80]}")
    print(f"audit: {len(suspects)} of {len(probs)} training rows flagged; review {out / SUSPECTS}, then retrain with "
          f"--data.exclude_rows {out / SUSPECTS} (details: {out / NOTES})", flush=True)
