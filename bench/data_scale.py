"""Data preparation at scale (issue 18): wall seconds, tokens/s and peak RSS of each rank for 10^6..10^8 tokens
of synthetic text, on 2 ranks, against two anchors on the same text and cores.

  packed      llmkit.data.lm.prepare, format text: tokenized and packed into 1024-token blocks in Arrow; rank 0
              prepares (cold cache), then rank 1 reads what rank 0 wrote, as in a run (Run.main_first)
  sft         the same for prompt/response rows (format prompt_response, the SmolLM2 chat template)
  stream      data.streaming: both ranks at once, each reading its share of the stream and packing it on the fly
              (llmkit.data.streaming.StreamLoader), to the end of one pass
  tokenizer   anchor, the limit: the fast tokenizer alone over the same documents, batches of 1000, no output kept,
              through the call the pipeline makes (llmkit.data.packing.ids_of: the backend's encode_batch_fast)
  tokenizer_call  the same through transformers' tokenizer(texts) call (it also computes character offsets)
  group_texts anchor: the HF examples' run_clm.py recipe (datasets map tokenize, then map group_texts)

Every measurement is its own process with an empty datasets cache (HF_DATASETS_CACHE in a fresh folder).
tokens/s counts the tokenizer's tokens of the text (the same number for every runner). Goals: time grows
linearly, peak RSS per rank < 2 GiB at 10^8 tokens, packed tokens/s >= 80% of the tokenizer alone. Peak RSS
includes the memory-mapped Arrow pages a rank has read (the kernel drops them under pressure); the anonymous
peak (RssAnon, sampled) is what the rank itself holds.

    .venv/bin/python bench/data_scale.py [--tokens 1e6 1e7 1e8] [--only packed stream tokenizer]

Writes bench/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
RUNNERS = ("packed", "sft", "stream", "tokenizer", "tokenizer_call", "group_texts")
BLOCK = 1024
WORDS_PER_DOC = 180


def write_corpus(folder: Path, tokens: int, sft: bool) -> None:
    """Synthetic English-like documents (train.jsonl, a small validation.jsonl) of about `tokens` tokens."""
    rng = random.Random(0)
    vocab = [w for w in (ROOT / "README.md").read_text().split() if w.isalpha()] or ["word"]
    folder.mkdir(parents=True, exist_ok=True)
    n_docs = max(2, int(tokens / (WORDS_PER_DOC * 1.07)))  # ~1.07 tokens per word for this vocabulary

    def doc():
        return " ".join(rng.choices(vocab, k=rng.randint(WORDS_PER_DOC // 2, WORDS_PER_DOC * 3 // 2)))

    for split, n in (("train", n_docs), ("validation", 50)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                text = doc()
                row = {"prompt": text[: len(text) * 3 // 4], "response": text[len(text) * 3 // 4:]} if sft \
                    else {"text": text}
                f.write(json.dumps(row) + "\n")


def _tokenizer():
    from transformers import AutoTokenizer

    from llmkit.assets import resolve

    return AutoTokenizer.from_pretrained(resolve("asset:smollm2"))


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: heap, Python objects), sampled every 20 ms.
    Peak RSS also counts the pages of memory-mapped Arrow files the process has read, which the kernel can drop
    at any time; RssAnon is the memory the process itself holds."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def worker(runner: str, folder: Path, rank: int, world: int) -> dict:
    """One measurement in this process; returns seconds, rows or blocks made, and this process's peak RSS."""
    from llmkit.config import DataConfig
    from llmkit.data import lm

    anon = AnonPeak()
    tok = _tokenizer()
    began = time.perf_counter()
    made = 0
    if runner in ("packed", "sft"):
        fmt = "text" if runner == "packed" else "prompt_response"
        data = lm.prepare(DataConfig(dataset=str(folder), test_split=None, max_length=BLOCK, format=fmt), tok,
                          seed=0, log=lambda _: None)
        made = len(data.train)
    elif runner == "stream":
        from llmkit.data.lm import LMCollator
        from llmkit.data.streaming import StreamLoader

        data = lm.prepare(DataConfig(dataset=str(folder), test_split=None, max_length=BLOCK, streaming=True,
                                     format="text"), tok, seed=0, log=lambda _: None)
        loader = StreamLoader(data.train, 8, LMCollator(tok.pad_token_id), rank, world)
        for batch in loader:
            if loader.dataset.epoch > 0:  # one pass done: this batch starts the next
                break
            made += batch["input_ids"].shape[0]
    elif runner in ("tokenizer", "tokenizer_call"):
        import datasets

        from llmkit.data.packing import ids_of

        ds = datasets.load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
        began = time.perf_counter()  # the limit: tokenizing only
        for start in range(0, len(ds), 1000):
            texts = ds[start:start + 1000]["text"]
            made += len(ids_of(tok, texts) if runner == "tokenizer" else
                        tok(texts, add_special_tokens=False)["input_ids"])
    elif runner == "group_texts":
        import datasets

        raw = datasets.load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
        ids = raw.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])

        def group_texts(examples):  # as in transformers' examples/pytorch/language-modeling/run_clm.py
            joined = {k: list(itertools.chain(*examples[k])) for k in examples}
            total = (len(joined["input_ids"]) // BLOCK) * BLOCK
            out = {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in joined.items()}
            out["labels"] = out["input_ids"].copy()
            return out

        made = len(ids.map(group_texts, batched=True))
    return {"seconds": time.perf_counter() - began, "made": made, "peak_anon_bytes": anon.stop(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _spawn(runner: str, folder: Path, cache: Path, rank: int, world: int) -> subprocess.Popen:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    return subprocess.Popen([sys.executable, __file__, "--worker", runner, str(folder), str(rank), str(world)],
                            env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _read(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        sys.exit(f"a worker failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure(runner: str, folder: Path, tokens: int) -> dict:
    """Wall seconds over both ranks (rank 0 then rank 1 for prepare; together for a stream) and each rank's RSS."""
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        if runner == "stream":
            ranks = [_read(p) for p in [_spawn(runner, folder, Path(cache), r, 2) for r in (0, 1)]]
        elif runner in ("packed", "sft"):
            ranks = [_read(_spawn(runner, folder, Path(cache), r, 2)) for r in (0, 1)]
        else:
            ranks = [_read(_spawn(runner, folder, Path(cache), 0, 1))]
        wall = time.perf_counter() - began
    inner = max(r["seconds"] for r in ranks) if runner not in ("packed", "sft") else sum(r["seconds"] for r in ranks)
    return {"runner": runner, "tokens": tokens, "wall_seconds": round(wall, 2), "work_seconds": round(inner, 2),
            "tokens_per_second": round(tokens / inner),
            "peak_rss_mib": [round(r["peak_rss_bytes"] / 2**20) for r in ranks],
            "peak_anon_mib": [round(r["peak_anon_bytes"] / 2**20) for r in ranks],
            "made": [r["made"] for r in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--only", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        runner, folder, rank, world = args.worker
        print(json.dumps(worker(runner, Path(folder), int(rank), int(world))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(t) for t in args.tokens):
            for sft in (False, True):
                runners = [r for r in args.only if (r == "sft") == sft]
                if not runners:
                    continue
                folder = Path(tmp) / f"{size}-{'sft' if sft else 'text'}"
                write_corpus(folder, size, sft)
                real = _count_tokens(folder, sft)
                for runner in runners:
                    r = measure(runner, folder, real)
                    results.append(r)
                    print(f"{r['runner']:12} {r['tokens']:>12,} tokens  {r['work_seconds']:>8.1f} s  "
                          f"{r['tokens_per_second']:>10,} tok/s  peak RSS {r['peak_rss_mib']} MiB (anonymous "
                          f"{r['peak_anon_mib']})", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "data_scale.json").write_text(json.dumps(results, indent=2))


def _count_tokens(folder: Path, sft: bool) -> int:
    """The tokenizer's token count of the train documents (prompt + response for SFT rows)."""
    tok = _tokenizer()
    total = 0
    with (folder / "train.jsonl").open() as f:
        batch = []
        for line in f:
            row = json.loads(line)
            batch.append(row["prompt"] + row["response"] if sft else row["text"])
            if len(batch) == 1000:
                total += sum(map(len, tok(batch, add_special_tokens=False)["input_ids"]))
                batch = []
        if batch:
            total += sum(map(len, tok(batch, add_special_tokens=False)["input_ids"]))
    return total


if __name__ == "__main__":
    main()
