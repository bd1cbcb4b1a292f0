"""A quantized copy reloaded in a fresh CPU process (llmkit.ship.quantize starts
it), and scored against the full model on the same rows: accuracy, macro-F1, agreement, size on disk, and the
time per row at batch 1 and batch 32, each model with the same number of threads."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from llmkit import compression, fresh
from llmkit.data import lm, scored
from llmkit.data.sources import load_raw, one_split
from llmkit.errors import LlmkitError
from llmkit.exported import loading, scoring
from llmkit.exported.opened import open_export
from llmkit.metrics import classification_metrics, perplexity
from llmkit.ship.to_gguf import GGUF_FILE

LATENCY_ROWS = 128  # rows timed one at a time (batch 1); batch 32 is timed over up to 8 batches
BATCH = 32


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _full_size(folder: Path) -> dict:
    """The full model's weight files on disk (as the run saved them: bf16 or fp32) and its parameter count."""
    from safetensors import safe_open

    count = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "np") as f:
            count += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return {"bytes": _size(folder, (".safetensors", ".bin")), "parameters": count}


def _size(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def _labeled(rows: dict, names: list[str], max_samples: int | None) -> tuple[list[str], list[str] | None, np.ndarray]:
    """The split's texts (and text pairs) and gold label ids, as `llmkit eval` reads them."""
    cfg = one_split(rows["source"], rows["split"], names, rows["text_column"], rows.get("text_pair_column"),
                    rows["label_column"], rows["max_length"], max_samples)
    data = scored.read(cfg, names, rows.get("label_map"), log=lambda m: None)
    pairs = list(data[rows["text_pair_column"]]) if rows.get("text_pair_column") else None
    return list(data[rows["text_column"]]), pairs, np.asarray(data["labels"])


def _against(out: dict, preds: dict | None, full: Path, copy: Path, suffixes: tuple[str, ...]) -> None:
    """The copy set against the full model: agreement and score changes (where both classified), sizes."""
    if preds is not None:
        out["agreement"] = float((preds["full"] == preds["copy"]).mean())
        out["accuracy_change"] = out["copy"]["accuracy"] - out["full"]["accuracy"]
        out["f1_macro_change"] = out["copy"]["f1_macro"] - out["full"]["f1_macro"]
    out["full"].update(_full_size(full))
    out["copy"]["bytes"] = _size(copy, suffixes)
    if not out["copy"]["bytes"]:
        raise LlmkitError(f"the {out['format']} copy in {copy} holds no weights")
    out["size_ratio"] = out["full"]["bytes"] / out["copy"]["bytes"]
    out["size_ratio_to_fp32"] = 4 * out["full"]["parameters"] / out["copy"]["bytes"]


def _onnx_predictor(folder: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda enc: session.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0]


def _torch_predictor(folder: Path, threads: int):
    import torch

    torch.set_num_threads(threads)
    model, _ = loading.classifier(open_export(folder))
    return scoring.torch_predictor(model)


def _run(predict, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> tuple[np.ndarray, dict]:
    """Logits of every row (in batches of 32, data order: exported.scoring, the one classifier scorer), and seconds
    per row at batch 1 and 32 after a warm-up."""
    def logits(lo: int, hi: int, batch: int = BATCH) -> np.ndarray:
        return scoring.classifier_logits(predict, tokenizer, texts[lo:hi], pairs[lo:hi] if pairs else None,
                                         max_length, batch, by_length=False)

    logits(0, min(BATCH, len(texts)))  # warm-up: first-call allocations are not a row's cost
    start = time.perf_counter()
    every = logits(0, len(texts))
    timed = (time.perf_counter() - start) / max(len(texts), 1)
    ones = min(LATENCY_ROWS, len(texts))
    start = time.perf_counter()
    logits(0, ones, 1)
    return every, {"batch_1": (time.perf_counter() - start) / max(ones, 1), "batch_32": timed}


def score(ask: dict) -> dict:
    return (score_classifier if compression.FORMATS[ask["format"]].kind == "classifier" else score_causal_lm)(ask)


def score_classifier(ask: dict) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    rows, full, copy = ask["rows"], Path(ask["full"]), Path(ask["copy"])
    threads = _threads()
    reference = _torch_predictor(full, threads)
    config = AutoConfig.from_pretrained(full)
    names = [config.id2label[i] for i in range(len(config.id2label))]
    texts, pairs, gold = _labeled(rows, names, ask.get("max_samples"))
    tokenizer = AutoTokenizer.from_pretrained(copy)
    served = {"onnx-int8": _onnx_predictor}[ask["format"]](copy, threads)
    out = {"format": ask["format"], "split": rows["split"], "source": rows["source"], "rows": len(texts),
           "threads": threads}
    preds = {}
    for side, predict in (("full", reference), ("copy", served)):
        logits, seconds = _run(predict, tokenizer, texts, pairs, rows["max_length"])
        preds[side] = logits.argmax(-1)
        m = classification_metrics(preds[side].tolist(), gold.tolist(), len(names))
        out[side] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
                     "ms_per_row_batch_1": 1000 * seconds["batch_1"], "ms_per_row_batch_32": 1000 * seconds["batch_32"]}
    _against(out, preds, full, copy, (".onnx", ".onnx.data", ".data"))
    out["speedup_batch_1"] = out["full"]["ms_per_row_batch_1"] / out["copy"]["ms_per_row_batch_1"]
    out["speedup_batch_32"] = out["full"]["ms_per_row_batch_32"] / out["copy"]["ms_per_row_batch_32"]
    return out


def score_causal_lm(ask: dict) -> dict:
    """A causal LM's copy read back (a GGUF by transformers' GGUF reader, its tokenizer too, from the file; a
    torchao copy by plain from_pretrained) against the full model: a label-word run's accuracy, macro-F1,
    agreement and the perplexity of its gold label words; any other run's perplexity on the split's text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, copy = ask["rows"], Path(ask["copy"])
    full = open_export(ask["full"]).model
    torch.set_num_threads(_threads())
    # a GGUF is read (and dequantized) by transformers' GGUF reader; a torchao copy loads as saved
    gguf = {"gguf_file": GGUF_FILE, "dtype": torch.float32} if ask["format"].startswith("gguf-") else {}
    sides = {"full": (AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval(),
                      AutoTokenizer.from_pretrained(full)),
             "copy": (AutoModelForCausalLM.from_pretrained(copy, **gguf).eval(),
                      AutoTokenizer.from_pretrained(copy, **gguf))}
    out = {"format": ask["format"], "split": rows["split"], "source": rows["source"], "threads": _threads()}
    if rows.get("prompt_template"):  # label words: classify, and the gold words' perplexity
        names = rows["label_names"]
        words = rows.get("label_words") or names
        texts, pairs, gold = _labeled(rows, names, ask.get("max_samples"))
        preds = {}
        for side, (model, tok) in sides.items():
            subject = scoring.LabelWordScorer(model, tok, rows["prompt_template"], list(words), names,
                                              rows["max_length"])
            start = time.perf_counter()
            scores = subject.batch_scores(texts, pairs, 16).numpy()
            seconds = time.perf_counter() - start
            # each label word's target tokens (the same after every prompt)
            per_word = [sum(t != lm.IGNORE for t in targets) for _, targets in subject.prompt(texts[0])[2]]
            tokens = np.array(per_word)[gold]
            preds[side] = scores.argmax(-1)
            m = classification_metrics(preds[side].tolist(), gold.tolist(), len(names))
            nll = -scores[np.arange(len(gold)), gold].sum() / tokens.sum()
            out[side] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "perplexity": perplexity(float(nll)),
                         "ms_per_row": 1000 * seconds / len(texts)}
        out["rows"] = len(texts)
    else:
        preds = None
        raw = load_raw(one_split(rows["source"], rows["split"], [], rows["text_column"], None, "label", 2, None))
        texts = [t for t in raw[rows["split"]][rows["text_column"]] if isinstance(t, str) and t.strip()]
        texts = texts[:ask.get("max_samples") or len(texts)]
        for side, (model, tok) in sides.items():
            start = time.perf_counter()
            total, count = scoring.text_nll(model, tok, texts, rows["max_length"])
            out[side] = {"perplexity": perplexity(total / max(count, 1)), "tokens": count,
                         "ms_per_row": 1000 * (time.perf_counter() - start) / len(texts)}
        out["rows"] = len(texts)
    out["perplexity_change"] = out["copy"]["perplexity"] / out["full"]["perplexity"] - 1
    _against(out, preds, full, copy, (".gguf", ".safetensors"))
    return out


def main(argv: list[str] | None = None) -> None:
    """The scoring process (started by ship.quantize): REQUEST, a JSON file its numbers are written back into."""
    where = Path((argv or sys.argv[1:])[0])
    try:
        where.write_text(json.dumps(score(json.loads(where.read_text()))))
    except LlmkitError as exc:
        print(f"llmkit: error: {exc}", file=sys.stderr, flush=True)
        fresh.end(2)
    fresh.end(0)


if __name__ == "__main__":
    main()
