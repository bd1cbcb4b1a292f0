"""Why the model said that: each word's attribution toward every label of an exported sequence classifier (its
logit less the mean logit), by
Captum's layer integrated gradients on the word embeddings, sub-tokens merged into the words of the text.

Baseline: the same sequence with every word token replaced by the pad token; the special tokens ([CLS], [SEP],
BOS), positions and attention mask are kept. The attributions then split f(text) - f(the same frame with no
words) among the words. The other usual baseline, a zero embedding, is a vector no token ever had; the pad
token's embedding is the model's own "nothing here", so the path stays among inputs the model has seen, and
the kept special tokens get exactly zero. `delta` is Captum's convergence delta: how far the attributions' sum
is from that difference (the integral's error at this number of steps)."""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from llmkit import fresh
from llmkit.errors import LlmkitError

STEPS = 16  # integration steps (Gauss-Legendre): delta stays below 1e-3 on MiniLM (bench/explain.py)
FILE = "explanations.json"  # in the run directory, read by the report
TOP_WORDS = 3  # a row's strongest words toward a label count in the split's summary


def load(model_dir: str | Path, trust_remote_code: bool = False):
    """The exported classifier of `model_dir` (a run's final/, its merged/ for LoRA runs, or any saved
    sequence classifier) and its tokenizer, on CPU in fp32."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(model_dir)
    if (path / "merged").is_dir():
        path = path / "merged"
    if not (path / "config.json").is_file():
        raise LlmkitError(f"{model_dir} holds no exported model (no config.json); give a run's final/ folder")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise LlmkitError(f"{model_dir} is not a sequence classifier ({', '.join(config.architectures or [])}): "
                          "explanations cover exported classifiers (recipes/classification.py)")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _words(text: str, enc, token_attr: torch.Tensor) -> tuple[list[str], list[float]]:
    """Token attributions summed into the words they came from (the tokenizer's word ids and offsets)."""
    spans: dict[int, list] = {}
    for pos, word in enumerate(enc.word_ids(0)):
        if word is None:
            continue
        start, end = enc["offset_mapping"][0][pos].tolist()
        span = spans.setdefault(word, [start, end, 0.0])
        span[0], span[1] = min(span[0], start), max(span[1], end)
        span[2] += float(token_attr[pos])
    ordered = [spans[w] for w in sorted(spans)]
    return [text[s:e] for s, e, _ in ordered], [a for _, _, a in ordered]


def explain(model, tokenizer, texts: list[str], steps: int = STEPS, max_length: int = 512) -> list[dict]:
    """For each text: its words, each word's attribution toward every label, the convergence delta per label,
    the probabilities and the prediction."""
    from captum.attr import LayerIntegratedGradients

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LlmkitError("the tokenizer has neither a pad nor an eos token, which the attribution baseline needs")
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)

    def score(ids, mask, label):
        # the label's logit less the mean logit: what moves every label alike cancels (softmax ignores it), and
        # unlike the log-probability it does not flatten where the model is sure, so nothing saturates to 0
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return logits[:, label] - logits.mean(-1)

    lig = LayerIntegratedGradients(score, model.get_input_embeddings())
    out = []
    for text in texts:  # one text at a time: IG already batches its steps, and lengths differ
        enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=limit, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        special = tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)
        baseline = ids.clone()
        baseline[0, [i for i, s in enumerate(special) if not s]] = pad
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0].float(), -1)
        attributions, deltas = {}, {}
        # two labels: the first's centred logit is minus the second's, so one pass explains both
        for label, name in list(enumerate(names))[1 if len(names) == 2 else 0:]:
            attr, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask, label),
                                        n_steps=steps, return_convergence_delta=True)
            words, per_word = _words(text, enc, attr.sum(-1)[0].detach())
            attributions[name], deltas[name] = [round(a, 6) for a in per_word], float(delta.abs().max())
        if len(names) == 2:
            attributions[names[0]], deltas[names[0]] = [-a for a in attributions[names[1]]], deltas[names[1]]
            attributions = {n: attributions[n] for n in names}
        out.append({"text": text, "words": words, "attributions": attributions, "delta": deltas,
                    "probabilities": [round(float(p), 6) for p in probs], "prediction": names[int(probs.argmax())]})
    return out


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
    counts: dict[str, Counter] = {}
    totals: dict[str, Counter] = {}
    for row in explained:
        for label, values in row["attributions"].items():
            top = sorted((v, w.lower()) for v, w in zip(values, row["words"]) if v > 0)[-TOP_WORDS:]
            counts.setdefault(label, Counter()).update(w for _, w in top)
            for v, w in top:
                totals.setdefault(label, Counter())[w] += v
    return {label: [[w, n] for w, n in sorted(c.items(), key=lambda t: (-t[1], -totals[label][t[0]]))[:8]]
            for label, c in counts.items()}


def for_run(run_dir: Path, split: str, count: int, seed: int, trust_remote_code: bool = False, log=print) -> dict:
    """Explain `count` rows of a run's predictions on `split` with its exported model, in a fresh CPU process
    (llmkit.fresh: not inside a training rank). Writes explanations.json."""
    log(f"explanations: explaining {count} rows of {split} word by word in a fresh CPU process")
    proc = fresh.run_python(["-m", "llmkit.evals.explain", str(fresh.absolute(run_dir)), split, str(count),
                             str(seed), str(int(trust_remote_code))])
    if proc.returncode != 0:
        raise LlmkitError(f"explaining the report's rows failed (the export and predictions are in place; rerun "
                          f"with output.explain_rows: 0 to skip it):\n{proc.stderr[-2000:]}")
    doc = json.loads((Path(run_dir) / FILE).read_text())
    log(f"explanations: {len(doc['rows'])} rows of {split} in {doc['seconds']} s ({Path(run_dir) / FILE})")
    if doc.get("disagree"):
        log(f"explanations: {doc['disagree']} row(s) come out otherwise in fp32 on the CPU than in the run (near ties "
            "in its precision); the report marks them")
    return doc


def _write(run_dir: Path, split: str, count: int, seed: int, trust_remote_code: bool) -> None:
    """What for_run runs in its fresh process."""
    began = time.perf_counter()
    rows = [json.loads(line) for line in (run_dir / f"predictions_{split}.jsonl").read_text().splitlines()]
    model, tokenizer = load(run_dir / "final", trust_remote_code)
    chosen = choose(rows, count, seed)
    explained = explain(model, tokenizer, [r["text"] for r in chosen])
    for row, done in zip(chosen, explained):
        # the export reproduces the run's logits (verified), but a bf16/fp16 run's near tie may come out the other
        # way in this fp32 process: kept and marked, not an error
        done.update(row=row["row"], label=row["label"], run_prediction=row["prediction"])
    doc = {"split": split, "steps": STEPS, "rows": explained, "summary": summary(explained),
           "baseline": "the text's word tokens replaced by the pad token; special tokens and mask kept",
           "disagree": sum(r["prediction"] != r["run_prediction"] for r in explained),
           "seconds": round(time.perf_counter() - began, 2)}
    (run_dir / FILE).write_text(json.dumps(doc, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    _write(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
    fresh.end(0)
