"""Why the model said that: each word's attribution toward every label of an exported classifier, for a run's
report (for_run: chosen rows of its predictions, in a fresh process) or for any texts (`llmkit explain`). The
attribution itself (integrated gradients on the embeddings, the baseline and why) is llmkit.evals.attribution."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from llmkit import faults, fresh
from llmkit.errors import LlmkitError
from llmkit.evals import attribution
from llmkit.exported import loading
from llmkit.exported.opened import CLASSIFIER, LABEL_WORDS, open_export
from llmkit.rundir import layout

# integration steps to start at (Gauss-Legendre): delta below 1e-3 on an untrained MiniLM (bench/explain.py); a
# trained model's sharp rows need more, and get them (attribution.explain doubles them up to max_steps)
STEPS = 16
TOP_WORDS = 3  # a row's strongest words toward a label count in the split's summary
BASELINE = "the text's word tokens replaced by the pad token; special tokens, prompt template and mask kept"


def load(model_dir: str | Path, trust_remote_code: bool = False, prompt_template: str | None = None,
         label_words: list[str] | None = None, max_length: int | None = None):
    """What to explain in `model_dir` (a run's final/, its merged/ for LoRA runs, or any saved classifier), on CPU
    in fp32: a sequence classifier, or a causal LM with its label words. The max length and a causal LM's prompt
    template and label words come from the run's training_config.yaml beside the model unless given."""
    opened = open_export(model_dir, prompt_template, label_words, max_length)
    limit = opened.max_length or 512  # the run's: texts cut as its predictions saw them
    if opened.kind == CLASSIFIER:
        model, tokenizer = loading.classifier(opened, trust_remote_code)
        return attribution.Classifier(model, tokenizer, limit)
    if opened.kind != LABEL_WORDS:
        raise LlmkitError(f"{model_dir} is a causal LM without the label words it classifies by (no run records "
                          "with data.prompt_template beside it): give --prompt-template and --label-words")
    if "{text}" not in opened.prompt_template:
        raise LlmkitError(f"the prompt template {opened.prompt_template!r} has no {{text}} slot for the text to "
                          "explain")
    model, tokenizer, _ = loading.causal_lm(opened, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return attribution.LabelWords(model, tokenizer, opened.prompt_template, list(opened.label_words),
                                  list(opened.labels), limit)


def explain(subject, texts: list[str], pairs: list[str | None] | None = None, steps: int = STEPS,
            max_steps: int = attribution.MAX_STEPS) -> list[dict]:
    """Each text's words and their attributions (attribution.explain): `steps` first, doubled up to `max_steps` for
    a row whose delta is over attribution.CONVERGED of what it explains."""
    return attribution.explain(subject, texts, pairs, steps, max_steps)


def steps_note(rows: list[dict], steps: int, max_steps: int) -> str:
    """What the steps were: raised for how many rows, and which rows the bound left over the tolerance."""
    raised = [r["steps"] for r in rows if r.get("steps", steps) > steps]
    left = sum(not r.get("converged", True) for r in rows)
    note = f"{steps} steps"
    if raised:
        note += (f", raised (doubled, up to {max(raised)}) for the {len(raised)} of {len(rows)} rows whose delta at "
                 f"{steps} was over {attribution.CONVERGED:.0%} of what they explain")
    if left:
        note += (f"; {left} row{'s' if left > 1 else ''} still over {attribution.CONVERGED:.0%} at the bound of "
                 f"{max_steps} steps, flagged")
    return note


def choose(rows: list[dict], count: int, seed: int) -> list[dict]:
    """The rows a report explains: up to half of `count` from the most confident mistakes, the rest a seeded
    sample of correct predictions spread over the classes."""
    wrong = sorted((r for r in rows if r["prediction"] != r["label"]), key=lambda r: -max(r["probabilities"]))
    chosen = wrong[:count // 2]
    rng = random.Random(seed)
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        if r["prediction"] == r["label"]:
            by_class.setdefault(r["label"], []).append(r)
    pools = [rng.sample(pool, len(pool)) for _, pool in sorted(by_class.items())]
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return chosen


def summary(explained: list[dict]) -> dict[str, list[list]]:
    """Per label, the words that are most often among a row's strongest pushes toward it (ties: the larger
    attribution in all first)."""
    tally: dict[str, dict[str, list]] = {}  # label -> word -> [rows, summed attribution]
    for row in explained:
        for label, values in row["attributions"].items():
            for v, w in sorted((v, w.lower()) for v, w in zip(values, row["words"]) if v > 0)[-TOP_WORDS:]:
                entry = tally.setdefault(label, {}).setdefault(w, [0, 0.0])
                entry[0], entry[1] = entry[0] + 1, entry[1] + v
    return {label: [[w, n] for w, (n, _) in sorted(words.items(), key=lambda t: (-t[1][0], -t[1][1]))[:8]]
            for label, words in tally.items()}


def for_run(run: layout.RunDir, split: str, count: int, seed: int, trust_remote_code: bool = False, log=print,
            max_steps: int = attribution.MAX_STEPS) -> dict:
    """Explain `count` rows of a run's predictions on `split` with its exported model, in a fresh CPU process
    (llmkit.fresh: not inside a training rank). Writes explanations.json."""
    log(f"explanations: explaining {count} rows of {split} word by word in a fresh CPU process")
    proc = fresh.run_python(["-m", "llmkit.evals.explain", str(fresh.absolute(run.root)), split, str(count),
                             str(seed), str(int(trust_remote_code)), str(max_steps)])
    if proc.returncode != 0:
        raise LlmkitError(f"explaining the report's rows failed (the export and predictions are in place; rerun "
                          f"with output.explain_rows: 0 to skip it):\n{proc.stderr[-2000:]}")
    where = run.explanations
    doc = json.loads(where.read_text())
    log(f"explanations: {len(doc['rows'])} rows of {split} in {doc['seconds']} s ({where})")
    if doc.get("disagree"):
        log(f"explanations: {doc['disagree']} row(s) come out otherwise in fp32 on the CPU than in the run (near ties "
            "in its precision); the report marks them")
    log(f"explanations: integrated gradients at {doc['steps_note']}")
    if doc.get("unconverged"):
        log(f"explanations: the model switches sharply between baseline and text in the {doc['unconverged']} "
            f"flagged row(s): raise output.explain_max_steps above {doc['max_steps']}, or `llmkit explain "
            "--max-steps` them")
    return doc


def _write(run_dir: Path, split: str, count: int, seed: int, trust_remote_code: bool,
           max_steps: int = attribution.MAX_STEPS) -> None:
    """What for_run runs in its fresh process."""
    if faults.ON and faults.hit("explain", 0, 0):
        raise RuntimeError("explaining failed (injected)")
    began = time.perf_counter()
    files = layout.RunDir(run_dir)
    rows, _ = layout.read_jsonl(files.predictions(split))
    subject = load(files.final.root, trust_remote_code)
    chosen = choose(rows, count, seed)
    explained = explain(subject, [r["text"] for r in chosen], [r.get("text_pair") for r in chosen],
                        max_steps=max_steps)
    for row, done in zip(chosen, explained):
        # the export reproduces the run's logits (verified), but a bf16/fp16 run's near tie may come out the other
        # way in this fp32 process: kept and marked, not an error
        done.update(row=row["row"], label=row["label"], run_prediction=row["prediction"])
    doc = {"split": split, "steps": STEPS, "max_steps": max_steps, "rows": explained, "summary": summary(explained),
           "baseline": BASELINE,
           "disagree": sum(r["prediction"] != r["run_prediction"] for r in explained),
           "unconverged": sum(not r["converged"] for r in explained),
           "raised": sum(r["steps"] > STEPS for r in explained), "tolerance": attribution.CONVERGED,
           "steps_note": steps_note(explained, STEPS, max_steps),
           "seconds": round(time.perf_counter() - began, 2)}
    files.explanations.write_text(json.dumps(doc, ensure_ascii=False, indent=1))


def for_texts(model_dir: str | Path, texts: list[str], pairs: list[str | None] | None, where: Path,
              prompt_template: str | None = None, label_words: list[str] | None = None) -> list[dict]:
    """Explain `texts` with the model in `model_dir` in a fresh CPU process (`llmkit compare`: one model at a time,
    none held in memory beside another); the request and the explained rows pass through `where` (a JSON file,
    replaced by the answer)."""
    where.write_text(json.dumps({"model": str(model_dir), "texts": texts, "pairs": pairs,
                                 "prompt_template": prompt_template, "label_words": label_words}))
    proc = fresh.run_python(["-m", "llmkit.evals.explain", "texts", str(fresh.absolute(where))])
    if proc.returncode != 0:
        raise LlmkitError(f"explaining rows with {model_dir} failed:\n{proc.stderr[-2000:]}")
    return json.loads(where.read_text())["rows"]


def _write_texts(where: Path) -> None:
    """What for_texts runs in its fresh process."""
    ask = json.loads(where.read_text())
    subject = load(ask["model"], prompt_template=ask["prompt_template"], label_words=ask["label_words"])
    where.write_text(json.dumps({"rows": explain(subject, ask["texts"], ask["pairs"])}, ensure_ascii=False))


def main(argv: list[str] | None = None) -> None:
    """The explaining process (started by for_run and for_texts): `texts WHERE`, or a run's rows."""
    argv = argv or sys.argv[1:]
    if argv[0] == "texts":
        _write_texts(Path(argv[1]))
    else:
        _write(Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), argv[4] == "1", int(argv[5]))
    fresh.end(0)


if __name__ == "__main__":
    main()
