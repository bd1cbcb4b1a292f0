"""`llmkit eval`: score any exported sequence classifier (llmkit's or not), or a label-word causal LM llmkit
exported, on a labelled split and write the predictions, metrics and the evaluation report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from llmkit import fresh
from llmkit.data import scored as scored_rows
from llmkit.data.sources import check_splits, one_split
from llmkit.errors import LlmkitError
from llmkit.evals.classification import write_predictions
from llmkit.exported import loading, scoring
from llmkit.exported.opened import CLASSIFIER, LABEL_WORDS, Opened, open_export, records_beside
from llmkit.launch.precision import cpu_has_native_bf16
from llmkit.metrics import averaging, classification_metrics, scores_line
from llmkit.model import locate
from llmkit.report import pages, runs
from llmkit.rundir import outputs
from llmkit.rundir.layout import RunDir, read_jsonl


def _check_output(out: Path, overwrite: bool) -> None:
    """A new or empty folder, or with `overwrite` an earlier `llmkit eval` output; never a training run's folder."""
    outputs.check(out, "llmkit eval", RunDir(out).eval_marker.is_file(), outputs.EVAL_WRITES, overwrite)


def _against_run(model_dir: Path, source: str, split: str, predicted: np.ndarray, names: list[str],
                 precision: str) -> dict | None:
    """Where these rows are the ones the export's own run scored (same data, split and row count), the run's number
    and how many rows the two scorings predict differently, so that a re-score that moves says why; else None."""
    config, metrics, _ = records_beside(model_dir)
    data, run = config.get("data") or {}, RunDir(model_dir.parent)
    role = {data.get("test_split"): "test", data.get("validation_split"): "validation"}.get(split)
    given = data.get("dataset") or (data.get("data_files") or {}).get(split)
    same = given is not None and (given == source or (Path(str(given)).expanduser().exists()
                                                      and fresh.absolute(given) == fresh.absolute(source)))
    reported = metrics.get(role) if role and same else None
    if not reported or reported.get("samples") != len(predicted) or not run.predictions(role).is_file():
        return None
    rows = {r["row"]: r["prediction"] for r in read_jsonl(run.predictions(role))[0]}
    moved = sum(rows.get(i) != names[p] for i, p in enumerate(predicted))
    ran = (run.read_run_info().get("precision") or "?")
    return {"accuracy": reported["accuracy"], "run_precision": ran, "rows_predicted_differently": moved,
            "why": None if not moved else f"the run scored in {ran} during training, this eval in {precision}: "
                                          f"{moved} near-tie row(s) fall the other way"}


def _write(out: Path, scored: dict, names: list[str], text_column: str, text_pair_column: str | None, facts: dict,
           precision: str) -> None:
    """The eval's files into `out`: the marker, each split's predictions, metrics.json, run_info.json, the report."""
    files = RunDir(out)
    files.eval_marker.write_text("written by `llmkit eval`; a later eval replaces it whole with --overwrite\n")
    for name, (rows, logits, labels, keep, _) in scored.items():
        write_predictions(files.predictions(name), rows,
                          {"logits": logits, "labels": labels, "row": np.arange(len(rows))}, names, text_column,
                          text_pair_column, keep)
    files.metrics.write_text(json.dumps({**{name: got[4] for name, got in scored.items()}, **facts}, indent=2) + "\n")
    info = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": 1, "precision": precision,
            "device": f"CPU {platform.machine()}, {os.cpu_count()} cores", "zero_stage": None}
    files.run_info.write_text(json.dumps(info, indent=2) + "\n")
    pages.build([out])


def _scorer(opened: Opened, max_length: int, trust_remote_code: bool, dtype, batch_size: int):
    """The one scorer of the export's kind (exported.scoring), as texts, pairs -> logits per label."""
    if opened.kind == CLASSIFIER:
        model, tokenizer = loading.classifier(opened, trust_remote_code)
        predict = scoring.torch_predictor(model.to(dtype) if dtype is not None else model)
        return lambda texts, pairs: scoring.classifier_logits(predict, tokenizer, texts, pairs, max_length,
                                                              batch_size, progress=True)
    if opened.kind != LABEL_WORDS:
        raise LlmkitError(f"'{opened.root}' is a causal LM without the run records that name its prompt template and "
                          "label words (training_config.yaml beside it): `llmkit eval` scores sequence classifiers "
                          "and the label-word exports of llmkit runs")
    model, tokenizer, _ = loading.causal_lm(opened, trust_remote_code=trust_remote_code, dtype=torch.float32)
    words = scoring.LabelWordScorer(model.to(dtype) if dtype is not None else model, tokenizer,
                                    opened.prompt_template, list(opened.label_words), list(opened.labels), max_length)
    # each label word's log-likelihood after the run's prompt, as the run's own evaluation ranks them
    return lambda texts, pairs: words.batch_scores(texts, pairs, max(1, batch_size // len(opened.labels))).numpy()


def _score_split(score, opened: Opened, source: str, name: str, rows_are: dict, max_samples: int | None,
                 label_map: dict | None, keep: tuple[str, ...], precision: str, zero_shot: bool) -> tuple:
    """One split scored: (rows, logits, gold ids, kept columns, its metrics)."""
    names, text_column, pair_column = opened.labels, rows_are["text_column"], rows_are["text_pair_column"]
    cfg = one_split(source, name, names, text_column, pair_column, rows_are["label_column"], rows_are["max_length"],
                    max_samples)
    rows = scored_rows.read(cfg, names, label_map, keep)
    texts, pairs = list(rows[text_column]), list(rows[pair_column]) if pair_column else None
    start = time.perf_counter()
    logits = np.asarray(score(texts, pairs), dtype=np.float32)
    seconds = time.perf_counter() - start
    labels = np.asarray(rows["labels"])
    metrics = classification_metrics(logits.argmax(-1).tolist(), labels.tolist(), len(names))
    seen = scored_rows.labels_seen(labels.tolist(), names)
    if note := scored_rows.said(seen):
        print(f"eval: split '{name}': {note}")
    run = None if zero_shot or max_samples else _against_run(opened.root, source, name, logits.argmax(-1), names,
                                                             precision)
    if run and run["why"]:
        print(f"eval: split '{name}': {runs.rescored(run, metrics['accuracy'])}")
    return rows, logits, labels, keep, {**metrics, "samples": len(texts), "seconds": round(seconds, 3),
                                        "labels_in_data": seen, **({"run_reported": run} if run else {})}


@torch.no_grad()
def eval_export(model_dir: str | Path, source: str, split: str | list[str] = "test",
                output_dir: str | Path | None = None, text_column: str | None = None,
                text_pair_column: str | None = None, label_column: str | None = None, max_length: int | None = None,
                batch_size: int = 64, max_samples: int | None = None, trust_remote_code: bool = False,
                zero_shot: tuple[str, list[str]] | None = None, keep_columns: tuple[str, ...] = (),
                precision: str = "fp32", label_map: dict[str, str] | None = None, overwrite: bool = False) -> dict:
    """Predict each split in `split` (one name or several) of `source` with the classifier in `model_dir` (or a
    run directory's final/); write predictions_<split>.jsonl, metrics.json, run_info.json and
    report.{json,md,html} into `output_dir` (default <model_dir>/eval-<first split>).
    `trust_remote_code` (or an llmkit export trained with it) runs the model folder's own Python code.
    `zero_shot` (prompt template, label words): `model_dir` is any causal LM (a folder or asset:<name>), untrained
    for the task, scoring each label word after the template; the words are the data's label names, in order.
    `keep_columns`: more columns of the first split copied into its prediction rows (under "columns").
    `precision`: fp32 (the reference), bf16, or auto (bf16 where the CPU has native bf16: ~3x faster there).
    Columns and max length not given are the run's (training_config.yaml beside the export), else text / label /
    512. `label_map`: data label -> model label, where the data names its labels otherwise (data.scored).
    `overwrite`: an earlier eval's `output_dir` is replaced whole (llmkit.rundir.outputs); else it is refused."""
    splits = [split] if isinstance(split, str) else list(dict.fromkeys(split))
    if zero_shot is not None:
        if output_dir is None:
            raise LlmkitError("a zero-shot eval needs --output (it writes nothing beside the model)")
        model_dir = locate(str(model_dir), "the zero-shot model")
    opened = open_export(model_dir, *(zero_shot or (None, None)))
    rows_are = scored_rows.settings({} if zero_shot else opened.data, text_column=text_column,
                                    text_pair_column=text_pair_column, label_column=label_column,
                                    max_length=max_length)
    if batch_size < 1 or rows_are["max_length"] < 2 or (max_samples is not None and max_samples < 1) or not splits:
        raise LlmkitError(f"--batch-size must be >= 1, --max-length >= 2, --max-samples >= 1 and a --split named; "
                          f"got {batch_size}, {rows_are['max_length']}, {max_samples}, {splits}")
    if precision not in ("fp32", "bf16", "auto"):
        raise LlmkitError(f"--precision must be fp32, bf16 or auto, got {precision!r}")
    out_dir = Path(output_dir).expanduser() if output_dir else opened.root / f"eval-{splits[0]}"
    _check_output(out_dir, overwrite)
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()) else None
    score = _scorer(opened, rows_are["max_length"], trust_remote_code, dtype, batch_size)
    check_splits(source, splits)
    used = "bf16" if dtype is not None else "fp32"
    scored = {name: _score_split(score, opened, source, name, rows_are, max_samples, label_map,
                                 tuple(keep_columns) if name == splits[0] else (), used, zero_shot is not None)
              for name in splits}
    names = opened.labels
    with outputs.replaced(out_dir) as build:  # swapped in whole once the report is written
        _write(build, scored, names, rows_are["text_column"], rows_are["text_pair_column"], {
            "label_names": names, **averaging(names), "model": str(opened.root), "dataset": source,
            "eval_seconds": round(sum(got[4]["seconds"] for got in scored.values()), 2)}, used)
    return {"metrics": scored[splits[0]][4], "splits": {n: got[4] for n, got in scored.items()},
            "label_names": names, "report": RunDir(out_dir).report("html"), "output_dir": out_dir}


def main(args: argparse.Namespace) -> None:
    """`llmkit eval`, from its parsed options: each split's scores, then where the report is."""
    if bool(args.zero_shot) != bool(args.prompt_template and args.label_words):
        raise LlmkitError("--zero-shot goes with --prompt-template and --label-words (and they only with it)")
    zero_shot = (args.prompt_template, args.label_words) if args.zero_shot else None
    got = eval_export(args.model_dir, args.data, args.split, args.output, args.text_column, args.text_pair_column,
                      args.label_column, args.max_length, args.batch_size, args.max_samples, args.trust_remote_code,
                      zero_shot, tuple(args.keep_columns), args.precision, scored_rows.parse_label_map(args.label_map),
                      args.overwrite)
    for split, m in got["splits"].items():
        print(f"{split}: {scores_line(m, got['label_names'])}")
    print(f"report: {got['report']}")
