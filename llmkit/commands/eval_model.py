"""`llmkit eval`: score any exported sequence classifier (llmkit's or not), or a label-word causal LM llmkit
exported, on a labelled split and write the predictions, metrics and the evaluation report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkit import fresh
from llmkit.config import ModelConfig
from llmkit.data import scored as scored_rows
from llmkit.data.sources import check_splits, one_split
from llmkit.errors import LlmkitError
from llmkit.evals import explain
from llmkit.evals.classification import write_predictions
from llmkit.metrics import averaging, classification_metrics
from llmkit.model import check_export_weights, locate, read_config, trusts_remote_code
from llmkit.precision import cpu_has_native_bf16
from llmkit.report import pages
from llmkit.rundir import life
from llmkit.rundir.layout import Export, RunDir, read_json, read_jsonl


def _load_classifier(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise LlmkitError(f"'{model_dir}' has no config.json: pass an exported model folder (e.g. <run>/final)")
    check_export_weights(model_dir)
    config = read_config(ModelConfig(name_or_path=str(model_dir), trust_remote_code=trust_remote_code))
    if not getattr(config, "id2label", None) or len(config.id2label) < 2:
        raise LlmkitError(f"'{model_dir}' is not a classifier with labels (its config has no id2label)")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True,
                                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LlmkitError(f"'{model_dir}' does not load as a sequence classifier: {str(exc).splitlines()[0]}") from None
    if info["missing_keys"]:  # a base model: transformers would score with a freshly initialised, random head
        missing = sorted(info["missing_keys"])
        raise LlmkitError(f"'{model_dir}' is not a fine-tuned classifier: {len(missing)} weights of its "
                          f"classification head are not in the checkpoint (e.g. {missing[0]}), so its predictions "
                          "would be random. Evaluate a fine-tuned export (e.g. <run>/final).")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _check_output(out: Path) -> None:
    """Write only into a new or empty folder, or an earlier `llmkit eval` output; never over a training run."""
    if life.is_run(out):
        raise LlmkitError(f"--output {out} is a training run's folder: its metrics.json and report would be "
                          "overwritten. Pick another --output.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not RunDir(out).eval_marker.is_file())):
        raise LlmkitError(f"--output {out} already holds files `llmkit eval` did not write; pick a new or empty "
                          "folder")


def _label_words(model_dir: Path, trust_remote_code: bool, max_length: int):
    """An llmkit label-word causal LM (its run's prompt template and label words beside it) as an
    attribution.LabelWords that scores each label; None for anything else (scored as a sequence classifier)."""
    folder = Export(model_dir).merged if Export(model_dir).merged.is_dir() else model_dir
    config = read_json(folder / "config.json")
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        return None
    if not explain.run_records(model_dir)[0].get("data", {}).get("prompt_template"):
        raise LlmkitError(f"'{model_dir}' is a causal LM without the run records that name its prompt template and "
                          "label words (training_config.yaml beside it): `llmkit eval` scores sequence classifiers "
                          "and the label-word exports of llmkit runs")
    return explain.load(model_dir, trust_remote_code, max_length=max_length)


def _zero_shot(model_dir: Path, trust_remote_code: bool, template: str, label_words: list[str], max_length: int):
    """A causal LM scoring `label_words` after `template` (with {text}): no run records needed."""
    config = read_json(model_dir / "config.json")
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise LlmkitError(f"zero-shot scoring needs a causal LM; '{model_dir}' is {config.get('architectures')}")
    if len(set(label_words)) != len(label_words) or len(label_words) < 2:
        raise LlmkitError(f"--label-words must list at least 2 distinct words, got {label_words}")
    return explain.load(model_dir, trust_remote_code, prompt_template=template, label_words=label_words,
                        max_length=max_length)  # no run records to name one: --max-length


def _classifier_logits(model, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
                       batch_size: int) -> np.ndarray:
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: little padding
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for b in tqdm(range(0, len(order), batch_size), desc="eval"):
        idx = order[b:b + batch_size]
        enc = tokenizer([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, padding=True,
                        truncation=True, max_length=limit, return_tensors="pt")
        logits[idx] = model(**enc).logits.float().numpy()
    return logits


def _against_run(model_dir: Path, source: str, split: str, predicted: np.ndarray, names: list[str],
                 precision: str) -> dict | None:
    """Where these rows are the ones the export's own run scored (same data, split and row count), the run's number
    and how many rows the two scorings predict differently, so that a re-score that moves says why; else None."""
    config, metrics = explain.run_records(model_dir)
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


def export_of(model_dir: Path) -> Path:
    """A run directory stands for its export (final/); anything else is the model folder itself."""
    final = RunDir(model_dir).final.root
    return final if not (model_dir / "config.json").is_file() and final.is_dir() else model_dir


@torch.no_grad()
def eval_export(model_dir: str | Path, source: str, split: str | list[str] = "test",
                output_dir: str | Path | None = None, text_column: str | None = None,
                text_pair_column: str | None = None, label_column: str | None = None, max_length: int | None = None,
                batch_size: int = 64, max_samples: int | None = None, trust_remote_code: bool = False,
                zero_shot: tuple[str, list[str]] | None = None, keep_columns: tuple[str, ...] = (),
                precision: str = "fp32", label_map: dict[str, str] | None = None) -> dict:
    """Predict each split in `split` (one name or several) of `source` with the classifier in `model_dir` (or a
    run directory's final/); write predictions_<split>.jsonl, metrics.json, run_info.json and
    report.{json,md,html} into `output_dir` (default <model_dir>/eval-<first split>).
    `trust_remote_code` (or an llmkit export trained with it) runs the model folder's own Python code.
    `zero_shot` (prompt template, label words): `model_dir` is any causal LM (a folder or asset:<name>), untrained
    for the task, scoring each label word after the template; the words are the data's label names, in order.
    `keep_columns`: more columns of the first split copied into its prediction rows (under "columns").
    `precision`: fp32 (the reference), bf16, or auto (bf16 where the CPU has native bf16: ~3x faster there).
    Columns and max length not given are the run's (training_config.yaml beside the export), else text / label /
    512. `label_map`: data label -> model label, where the data names its labels otherwise (data.scored)."""
    splits = [split] if isinstance(split, str) else list(dict.fromkeys(split))
    recorded = {} if zero_shot else explain.run_records(export_of(Path(model_dir).expanduser()))[0].get("data") or {}
    rows_are = scored_rows.settings(recorded, text_column=text_column, text_pair_column=text_pair_column,
                                    label_column=label_column, max_length=max_length)
    text_column, text_pair_column = rows_are["text_column"], rows_are["text_pair_column"]
    label_column, max_length = rows_are["label_column"], rows_are["max_length"]
    if batch_size < 1 or max_length < 2 or (max_samples is not None and max_samples < 1) or not splits:
        raise LlmkitError(f"--batch-size must be >= 1, --max-length >= 2, --max-samples >= 1 and a --split named; "
                          f"got {batch_size}, {max_length}, {max_samples}, {splits}")
    if zero_shot is not None:
        if output_dir is None:
            raise LlmkitError("a zero-shot eval needs --output (it writes nothing beside the model)")
        model_dir = Path(locate(str(model_dir), "the zero-shot model"))
    model_dir = export_of(Path(model_dir).expanduser())
    remote = trust_remote_code or trusts_remote_code(model_dir)
    if precision not in ("fp32", "bf16", "auto"):
        raise LlmkitError(f"--precision must be fp32, bf16 or auto, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()) else None
    words = _zero_shot(model_dir, remote, *zero_shot, max_length) if zero_shot else \
        _label_words(model_dir, remote, max_length)
    if words is None:
        model, tokenizer = _load_classifier(model_dir, remote)
        names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    else:
        model, names = words.model, words.names
    if dtype is not None:
        model.to(dtype)
    out_dir = Path(output_dir).expanduser() if output_dir else model_dir / f"eval-{splits[0]}"
    _check_output(out_dir)
    check_splits(source, splits)
    scored, seconds = {}, {}
    for name in splits:
        cfg = one_split(source, name, names, text_column, text_pair_column, label_column, max_length, max_samples)
        keep = tuple(keep_columns) if name == splits[0] else ()
        rows = scored_rows.read(cfg, names, label_map, keep)
        texts = list(rows[text_column])
        pairs = list(rows[text_pair_column]) if text_pair_column else None
        start = time.perf_counter()
        if words is None:
            logits = _classifier_logits(model, tokenizer, texts, pairs, max_length, batch_size)
        else:  # each label word's log-likelihood after the run's prompt, as the run's own evaluation ranks them
            logits = words.batch_scores(texts, pairs, max(1, batch_size // len(names))).numpy().astype(np.float32)
        seconds[name] = time.perf_counter() - start
        labels = np.asarray(rows["labels"])
        metrics = classification_metrics(logits.argmax(-1).tolist(), labels.tolist(), len(names))
        seen = scored_rows.labels_seen(labels.tolist(), names)
        if note := scored_rows.said(seen):
            print(f"eval: split '{name}': {note}")
        run = None if zero_shot or max_samples else _against_run(
            model_dir, source, name, logits.argmax(-1), names, "bf16" if dtype is not None else "fp32")
        if run and run["why"]:
            print(f"eval: split '{name}': the run reported accuracy {run['accuracy']:.4f}, this re-score "
                  f"{metrics['accuracy']:.4f}; {run['why']}")
        scored[name] = (rows, logits, labels, keep, {**metrics, "samples": len(texts),
                                                     "seconds": round(seconds[name], 3), "labels_in_data": seen,
                                                     **({"run_reported": run} if run else {})})
    out_dir.mkdir(parents=True, exist_ok=True)
    files = RunDir(out_dir)
    files.eval_marker.write_text("written by `llmkit eval`; a later eval may replace these files\n")
    for name, (rows, logits, labels, keep, _) in scored.items():
        write_predictions(files.predictions(name), rows,
                          {"logits": logits, "labels": labels, "row": np.arange(len(rows))}, names, text_column,
                          text_pair_column, keep)
    files.metrics.write_text(json.dumps({
        **{name: got[4] for name, got in scored.items()}, "label_names": names, **averaging(names),
        "model": str(model_dir), "dataset": source, "eval_seconds": round(sum(seconds.values()), 2)}, indent=2) + "\n")
    info = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": 1,
            "precision": "bf16" if dtype is not None else "fp32",
            "device": f"CPU {platform.machine()}, {os.cpu_count()} cores", "zero_stage": None}
    files.run_info.write_text(json.dumps(info, indent=2) + "\n")
    paths = pages.build([out_dir])
    return {"metrics": scored[splits[0]][4], "splits": {n: got[4] for n, got in scored.items()},
            "label_names": names, "report": paths["html"], "output_dir": out_dir}
