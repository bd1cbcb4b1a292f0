"""`llmkit compare A B [C ...]`: classifiers scored on the same rows, each by `llmkit eval` in a fresh process,
then for every pair what a reviewer asks before believing that one is better: the differences in accuracy and
macro-F1 with paired-bootstrap intervals, McNemar's exact test, how often they agree and the rows where they
disagree most confidently (explained word by word); per model the per-class scores and the calibration before
and after a temperature fitted on another split; every number again per slice (true label, text length, any
column named). The verdicts are corrected for their number (Holm); the slices' p-values are exploratory. A
statistic the rows cannot give says why (llmkit.report.undefined), and one that fails unexpectedly loses only its
own entry: the scored models (model-N/) and every other number still reach compare.json, compare.md and
compare.html (llmkit.report.compared)."""

from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

from llmkit import fresh
from llmkit.data.sources import check_splits, load_raw, one_split
from llmkit.errors import LlmkitError
from llmkit.evals import explain
from llmkit.exported.opened import CLASSIFIER, LABEL_WORDS, export_of, open_export, records_beside
from llmkit.model import locate
from llmkit.report import compared, paired, runs
from llmkit.report.numbers import calibration, read_predictions, split_report
from llmkit.report.undefined import defined, not_defined
from llmkit.rundir import outputs
from llmkit.rundir.layout import COMPARE, REPORT_KINDS, RunDir, read_json

MARKER = ".llmkit-compare"  # a `llmkit compare` output folder, which a later compare replaces with --overwrite
PAGES = {kind: COMPARE.format(kind=kind) for kind in REPORT_KINDS}  # compare.json, compare.md, compare.html
FILES = (*PAGES.values(), "model-*", "explain-model-*.json", MARKER)  # all it writes


def _folder(model: str) -> Path:
    """The export a model names: a folder, a run directory's final/, or (zero-shot) an asset."""
    if model.startswith("zero-shot:"):
        return Path(locate(model.removeprefix("zero-shot:"), "the zero-shot model"))
    return open_export(model).root


def _label(model: str) -> str:
    """A short name for tables: the run's folder for a run's export, else the folder's own name."""
    if model.startswith("zero-shot:"):
        return f"zero-shot {_folder(model).name}"
    return open_export(model).name


def _labels_of(model: str, zero_shot: list[str] | None) -> list[str] | None:
    """A model's labels in order, read from its files before anything is scored (None where a zero-shot model's
    words are not given yet): a classifier's id2label, a label-word export's run records, the zero-shot words."""
    if model.startswith("zero-shot:"):
        return zero_shot[zero_shot.index("--label-words") + 1:] if zero_shot else None
    opened = open_export(model)
    if opened.kind not in (CLASSIFIER, LABEL_WORDS):
        raise LlmkitError(f"{model} is not a classifier: neither a sequence classifier with labels nor an llmkit "
                          "label-word causal LM (score an untrained causal LM as zero-shot:<folder>)")
    return opened.labels


def _calibration_split(source: str, split: str, asked: str | None) -> tuple[str | None, str | None]:
    """The split the temperature is fitted on, or None with the reason. `asked` None: the data's validation split
    where it has one; "none": no temperature."""
    single = Path(source).expanduser().is_file()
    if asked == "none":
        return None, "not asked (--calibration-split none)"
    if asked is not None:
        if single or asked == split:
            raise LlmkitError(f"--calibration-split {asked}: the temperature must be fitted on other rows than the "
                              f"compared {split} rows; give --data as a folder or Hub dataset with that split")
        check_splits(source, [asked])
        return asked, None
    if single:
        return None, "--data is one file: no other split to fit a temperature on (--calibration-split)"
    try:
        check_splits(source, ["validation"])
    except LlmkitError:
        return None, "the data has no validation split (name one with --calibration-split)"
    return ("validation", None) if split != "validation" else (None, "the compared split is the validation split")


def score(model: str, out: Path, source: str, splits: list[str], eval_args: list[str], keep: list[str]) -> dict:
    """`llmkit eval` of one model on `splits` into `out`, in a fresh process; per split the prediction rows."""
    proc = fresh.run_python(["-m", "llmkit.cli", "eval", model, "--data", source, "--split", *splits, "--output",
                             str(out), *eval_args, *(["--keep-columns", *keep] if keep else [])], cwd=out.parent)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
        raise LlmkitError(f"scoring {model} failed: " + (said[-1].removeprefix("llmkit: error: ") if said else
                                                         proc.stderr[-2000:]))
    files = RunDir(out)
    metrics = read_json(files.metrics)
    names = metrics["label_names"]
    index = {name: i for i, name in enumerate(names)}
    got = {"labels": names, "metrics": metrics, "seconds_per_row": metrics[splits[0]]["seconds"]
           / max(metrics[splits[0]]["samples"], 1), "run_reported": metrics[splits[0]].get("run_reported")}
    for split in splits:
        rows = sorted(read_predictions(files.predictions(split), names)[0], key=lambda r: r["row"])
        got[split] = {"rows": rows, "gold": np.array([index[r["label"]] for r in rows]),
                      "predicted": np.array([index[r["prediction"]] for r in rows]),
                      "probs": np.array([r["probabilities"] for r in rows], dtype=float)}
    return got


def _model_numbers(s: dict, split: str, fit_on: str | None) -> dict:
    """One model's scores on the compared rows, and its calibration before and after temperature scaling."""
    rep = split_report(s[split]["rows"], s["labels"])
    out = {k: rep[k] for k in ("accuracy", "f1_macro", "rows", "per_class", "ece")}
    # the rows resampled (report.numbers.bootstrap), fewer times than the pairs' intervals
    out["accuracy_ci95"], out["accuracy_ci95_resamples"] = rep["ci95"]["accuracy"], rep["ci95"]["resamples"]
    out["seconds_per_row"] = s["seconds_per_row"]
    if fit_on is not None:
        fit = paired.fit_temperature(s[fit_on]["probs"], s[fit_on]["gold"])
        if not defined(fit):  # no temperature is best on those rows: its reason and counts, no ECE after it
            out["temperature"] = {**fit, "fitted_on": fit_on}
            return out
        probs = paired.tempered(s[split]["probs"], fit["temperature"])
        right = (probs.argmax(1) == s[split]["gold"]).astype(float)
        out["temperature"] = {**fit, "fitted_on": fit_on, "ece_after": calibration(probs.max(1), right)["ece"]}
    return out


def _slices(first: dict, split: str, slice_by: list[str]) -> dict[str, np.ndarray]:
    """Row masks by true label, by text length (quartiles of characters) and by each --slice-by column."""
    rows = first[split]["rows"]
    masks = {f"label = {name}": first[split]["gold"] == i for i, name in enumerate(first["labels"])}
    masks.update(paired.length_quartiles(np.array([len(r["text"]) + len(r.get("text_pair") or "") for r in rows])))
    for column in slice_by:
        masks.update(paired.by_value(column, [r["columns"][column] for r in rows]))
    return masks


def _explained_disagreements(scored: list[dict], models: list[str], split: str, count: int, work: Path,
                             zero_shot: list[str] | None) -> list[dict]:
    """Per pair the `count` rows where both models are surest while disagreeing; each model explains its rows
    (one fresh process per model) where `count` > 0."""
    found = []
    for i, j in combinations(range(len(scored)), 2):
        a, b = scored[i][split], scored[j][split]
        for row in paired.disagreements(a["predicted"], b["predicted"], a["probs"].max(1), b["probs"].max(1), count):
            found.append({"a": f"model-{i + 1}", "b": f"model-{j + 1}", "row": row, "text": a["rows"][row]["text"],
                          "label": a["rows"][row]["label"], "predictions": {
                              f"model-{k + 1}": {"prediction": scored[k][split]["rows"][row]["prediction"],
                                                 "probability": float(scored[k][split]["probs"][row].max())}
                              for k in (i, j)}})
    for k, model in enumerate(models):
        name = f"model-{k + 1}"
        mine = sorted({d["row"] for d in found if name in (d["a"], d["b"])})
        if not mine:
            continue
        rows = scored[k][split]["rows"]
        words = zero_shot[zero_shot.index("--label-words") + 1:] if model.startswith("zero-shot:") else None
        template = zero_shot[zero_shot.index("--prompt-template") + 1] if words else None
        print(f"compare: explaining {len(mine)} disagreeing rows with {model}", file=sys.stderr, flush=True)
        try:
            done = dict(zip(mine, explain.for_texts(
                _folder(model), [rows[r]["text"] for r in mine],
                [rows[r].get("text_pair") for r in mine] if "text_pair" in rows[0] else None,
                work / f"explain-{name}.json", template, words)))
        except LlmkitError as exc:  # the scores stand without the words; the report says why they are missing
            print(f"compare: {exc}", file=sys.stderr, flush=True)
            done = {r: {"error": str(exc).splitlines()[0]} for r in mine}
        for d in found:
            if name in (d["a"], d["b"]):
                d["predictions"][name]["explanation"] = done[d["row"]]
    return found


class _Failures:
    """The statistics that failed unexpectedly, each in its entry's place ({"error": ...}), listed in the
    document's `errors` and said in one line: the scored models and every other number still reach the pages."""

    def __init__(self, said: list[str]):
        self.said = said

    def guard(self, what: str, compute, *args):
        try:
            return compute(*args)
        except Exception as exc:  # recorded where the number would be, never dropped unseen
            text = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or ["(no message)"])[0]
            self.said.append(f"{what}: {text}")
            print(f"compare: {what} failed ({text}); {PAGES['json']} records it and keeps the rest", file=sys.stderr,
                  flush=True)
            return {"error": text}


def _pairs(failed: _Failures, scored: list[dict], split: str, mask: np.ndarray | None, resamples: int, seed: int,
           where: str = "") -> list[dict]:
    """Every pair of models on the rows of `mask` (all rows where None)."""
    pick = (lambda v: v) if mask is None else (lambda v: v[mask])
    gold, classes = pick(scored[0][split]["gold"]), len(scored[0]["labels"])
    return [{"a": f"model-{i + 1}", "b": f"model-{j + 1}", **failed.guard(
        f"model-{i + 1} vs model-{j + 1}{where}", paired.pair, gold, pick(scored[i][split]["predicted"]),
        pick(scored[j][split]["predicted"]), classes, resamples, seed)} for i, j in combinations(range(len(scored)), 2)]


def _slice(failed: _Failures, scored: list[dict], split: str, name: str, mask: np.ndarray, resamples: int,
           seed: int) -> dict:
    """Each model's accuracy on a slice's rows and every pair there (a slice of no rows: each says so)."""
    rows = int(mask.sum())
    return {"rows": rows, "accuracy": {
        f"model-{k + 1}": float((s[split]["predicted"][mask] == s[split]["gold"][mask]).mean()) if rows else
        not_defined("no rows", rows=0) for k, s in enumerate(scored)},
        "pairs": _pairs(failed, scored, split, mask, resamples, seed, f" in slice {name}")}


def _differences(models: list[str]) -> dict | None:
    """The training settings in which the models that are run exports differ (their training_config.yaml, as
    `llmkit report A B` lists them); None where fewer than two models are run exports."""
    configs = {f"model-{i + 1}": records_beside(export_of(Path(m)))[0] for i, m in enumerate(models)
               if not m.startswith("zero-shot:")}
    configs = {name: config for name, config in configs.items() if config}
    if len(configs) < 2:
        return None
    return {"models": list(configs), "rows": runs.differences(list(configs.values()))}


def document(scored: list[dict], models: list[str], labels: list[str], split: str, source: str, fit_on: str | None,
             why_not: str | None, slice_by: list[str], resamples: int = 2000, seed: int = 0) -> dict:
    """Every number of the comparison from the scored models (no disagreements yet). Each entry computed on its
    own: one that fails holds {"error": ...} and is listed in `errors`; the others stand."""
    failed = _Failures([])
    pairs = _pairs(failed, scored, split, None, resamples, seed)
    testing = failed.guard("the correction for multiple testing", paired.holm, pairs)
    masks = failed.guard("cutting the rows into slices", _slices, scored[0], split, slice_by)
    cut = max(resamples // 4, 100)  # many slices: a quarter of the resamples each
    slices = {name: failed.guard(f"slice {name}", _slice, failed, scored, split, name, mask, cut, seed)
              for name, mask in masks.items()} if "error" not in masks else {}
    testing["slices"] = ("uncorrected, exploratory: each slice's p-values are tested on their own, with no correction "
                         "for how many slices and pairs there are")
    return {"split": split, "data": source, "rows": len(scored[0][split]["gold"]), "labels": scored[0]["labels"],
            "calibration_split": fit_on, "calibration_note": why_not, "slice_by": slice_by,
            "models": [{"name": f"model-{i + 1}", "model": m, "label": labels[i], **failed.guard(
                f"the numbers of model-{i + 1}", _model_numbers, s, split, fit_on),
                **({"run_reported": s["run_reported"]} if s.get("run_reported") else {})}
                for i, (m, s) in enumerate(zip(models, scored))],
            "differences": failed.guard("how the models differ", _differences, models),
            "pairs": pairs, "multiple_testing": testing, "bootstrap_resamples": resamples, "slice_resamples": cut,
            "slices": slices, "disagreements": [], "errors": failed.said}


def _score_all(models: list[str], out: Path, source: str, splits: list[str], eval_args: list[str],
               zero_shot: list[str] | None, slice_by: list[str]) -> list[dict]:
    """Each model scored by `llmkit eval` into out/model-N/, in turn; labels that differ stop it there."""
    scored = []
    for i, model in enumerate(models):
        print(f"compare: scoring {model} ({i + 1} of {len(models)})", file=sys.stderr, flush=True)
        extra = zero_shot if model.startswith("zero-shot:") and zero_shot else []
        scored.append(score(model.removeprefix("zero-shot:"), out / f"model-{i + 1}", source, splits,
                             eval_args + extra, slice_by))
        if scored[-1]["labels"] != scored[0]["labels"]:
            raise LlmkitError(f"the models classify into different labels: {models[0]} has {scored[0]['labels']}, "
                              f"{model} has {scored[-1]['labels']}; compare models of the same task and label order")
    return scored


def compare(models: list[str], source: str, split: str, output_dir: str | Path, eval_args: list[str],
            resamples: int = 2000, seed: int = 0, zero_shot: list[str] | None = None,
            calibration_split: str | None = None, slice_by: list[str] = (), explain_rows: int = 2,
            overwrite: bool = False) -> dict:
    """Score each model on `split` of `source` (and on the calibration split) and compare every pair; write
    compare.json, compare.md and compare.html into `output_dir`. `eval_args`: more `llmkit eval` options
    (columns, max length, batch size, max samples); `zero_shot`: the eval options of the models named
    zero-shot:<model> (template, label words); `slice_by`: more data columns to cut the rows by; `overwrite`: an
    earlier comparison in `output_dir` is replaced whole (llmkit.rundir.outputs), else refused."""
    models, slice_by = [str(m) for m in models], list(slice_by)
    if Path(source).expanduser().exists():  # a local path, read by each model's eval in another folder
        source = str(fresh.absolute(source))
    out = fresh.absolute(output_dir)
    outputs.check(out, "llmkit compare", (out / MARKER).is_file(), FILES, overwrite)
    if len(models) < 2:
        raise LlmkitError("llmkit compare needs at least two models")
    if resamples < 100 or explain_rows < 0:
        raise LlmkitError(f"--resamples must be >= 100 for a 95% interval to mean anything and --explain-rows >= 0; "
                          f"got {resamples}, {explain_rows}")
    known = {m: names for m in models if (names := _labels_of(m, zero_shot)) is not None}
    if len({tuple(names) for names in known.values()}) > 1:  # refused before any model is scored
        (a, first), (b, other) = next(iter(known.items())), next((m, n) for m, n in known.items()
                                                                if n != next(iter(known.values())))
        raise LlmkitError(f"the models classify into different labels: {a} has {first}, {b} has {other}; compare "
                          "models of the same task and label order")
    check_splits(source, [split])
    fit_on, why_not = _calibration_split(source, split, calibration_split)
    if slice_by:
        have = load_raw(one_split(source, split, [], "text", None, "label", 2, None))[split].column_names
        if missing := [c for c in slice_by if c not in have]:
            raise LlmkitError(f"--slice-by {missing[0]}: split '{split}' of {source} has no such column "
                              f"(columns: {have})")
    unpainted = None
    with outputs.replaced(out) as build:  # built beside `out`, swapped in once compare.json is written
        (build / MARKER).write_text("written by `llmkit compare`; a later compare replaces it whole with "
                                    "--overwrite\n")
        scored = _score_all(models, build, source, [split] + ([fit_on] if fit_on else []), eval_args, zero_shot,
                            slice_by)
        doc = document(scored, models, [_label(m) for m in models], split, source, fit_on, why_not, slice_by,
                       resamples, seed)
        if explain_rows:
            found = _Failures(doc["errors"]).guard("explaining the disagreements", _explained_disagreements, scored,
                                                   models, split, explain_rows, build, zero_shot)
            doc["disagreements"] = [] if isinstance(found, dict) else found
        try:
            compared.write(doc, build)
        except Exception as exc:  # a page that cannot be drawn: the numbers are in compare.json (written first)
            if not (build / PAGES["json"]).is_file():
                raise
            unpainted = exc
    if unpainted is not None:
        raise LlmkitError(f"{PAGES['json']} is written, but drawing its pages failed: {type(unpainted).__name__}: "
                          f"{unpainted}") from unpainted
    return doc


def main(args: argparse.Namespace) -> None:
    """`llmkit compare`, from its parsed options: each model scored by `llmkit eval` with the same row options."""
    eval_args = ["--batch-size", str(args.batch_size), "--precision", args.precision]
    for flag, value in (("--text-column", args.text_column), ("--text-pair-column", args.text_pair_column),
                        ("--label-column", args.label_column), ("--max-length", args.max_length),
                        ("--max-samples", args.max_samples)):  # what is not given, each model's eval takes from its run
        eval_args += [flag, str(value)] if value is not None else []
    eval_args += ["--label-map", *args.label_map] if args.label_map else []
    zero_shot = ["--zero-shot", "--prompt-template", args.prompt_template, "--label-words", *args.label_words] \
        if args.prompt_template and args.label_words else None
    if any(m.startswith("zero-shot:") for m in args.models) and zero_shot is None:
        raise LlmkitError("a zero-shot: model needs --prompt-template and --label-words")
    doc = compare(args.models, args.data, args.split, args.output, eval_args, args.resamples, args.seed, zero_shot,
                  args.calibration_split, args.slice_by or [], args.explain_rows, args.overwrite)
    for m in doc["models"]:
        print(f"{m['name']}: " + (f"its numbers failed ({m['error']})" if "error" in m else
                                  f"accuracy {m['accuracy']:.4f}  f1_macro {m['f1_macro']:.4f}") + f"  ({m['model']})")
        if "run_reported" in m and "error" not in m:
            print(f"  {runs.rescored(m['run_reported'], m['accuracy'])}")
    print("\n".join(compared.verdict(doc)) + f"\ncomparison: {Path(args.output) / PAGES['html']} (and "
          f"{PAGES['md']}, {PAGES['json']})")
