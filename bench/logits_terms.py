"""The logits-and-loss and evaluation-batch terms of issue 50, measured in one process: how many bytes of tensors the
output head and the loss hold at once, beyond the model's own activations, on the full logits (train.loss_chunk 0,
the path of 5c31b18) and chunked (llmkit.model.lm_head), for SmolLM2-135M (the offline asset, fp32) at the shipped
recipes' shapes and at 4x their length. Also the step's time on each path (paired reps, the median of the paired
ratios with a 95% bootstrap interval: bench/_common.py median_ratio), in one process without DeepSpeed: the
head's share of a step without a launch's noise (bench/logits_memory.py measures whole runs on 2 ranks).

Each workload runs three ways, each path's peak memory the high-water mark of the resident set over what it held
before (PeakResident: with the allocator set to return freed tensors, the peak of live tensors, as a GPU's
max_memory_allocated counts them; the weights exist before and are not counted), after one warm-up pass of each:
the base (the model with the head kept at one position a row: its activations, and the head weight's gradient
where the head trains), the full logits, the chunked path. A term is the path's peak minus the base's. That
allocator maps and unmaps every tensor over 64 KiB, which slows the path making more large tensors: the table's
times are the `--timing` rows', glibc's default allocator.

    .venv/bin/python bench/logits_terms.py [--reps 5] [--chunk 512]   # appends to bench/results/logits_terms.jsonl
    .venv/bin/python bench/logits_terms.py --timing [--reps 5]        # the times under glibc's default allocator
    .venv/bin/python bench/logits_terms.py --table [--commit c530620]

Each row names the commit of the code it measured (`commit`: the newest commit that changed llmkit/; rows without one
are c530620's); a row of the same workload, chunk, host, allocator and commit is not measured again, and the table
shows one commit's rows (default: the code's now).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmkit import assets
from llmkit.data.packing import IGNORE
from llmkit.exported.scoring import token_logprobs
from llmkit.model import lm_head

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "logits_terms.jsonl"
GIB = 2**30
# name: (LoRA, rows, length, scored positions a row (None: every one), training)
WORKLOADS = {
    "label words, training micro-batch": (True, 8, 160, 2, True),  # the word and the end token
    "label words, evaluation batch": (True, 16 * 2, 160, 1, False),  # 16 rows x 2 candidates, the word scored
    "label words 4x, training micro-batch": (True, 8, 640, 2, True),
    "text, training micro-batch": (False, 4, 256, None, True),  # packed blocks: every position a target
    "text 4x, training micro-batch": (False, 1, 1024, None, True),
}


class PeakResident:
    """The peak of the resident set inside the block beyond what it was at the start: Linux's high-water mark (VmHWM),
    reset on entry by writing "5" to /proc/self/clear_refs. With MALLOC_MMAP_THRESHOLD_ fixed (main sets it) every
    tensor over 64 KiB is its own mapping, returned to the system when freed, so the resident set follows the live
    tensors (bench/memory_predict.py explains why). Counted from outside the allocator, it changes nothing autograd
    does (a dispatch mode that keeps a handle on each storage would: it stops autograd summing a tied weight's two
    gradients in place)."""

    def __enter__(self):
        self.start = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") - self.start


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _model(lora: bool):
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(assets.resolve("asset:smollm2"), dtype=torch.float32)
    if lora:  # the recipe's rank on every linear of the blocks (what is adapted moves the base, not the terms)
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    return net.train()


def _batch(vocab: int, rows: int, length: int, scored: int | None) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    if scored is not None:  # a prompt, then the scored answer at the row's end
        labels[:, :-scored] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _paths(net, batch: dict, training: bool, chunk: int) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["labels"]
    if not training:  # the evaluation's scores, no gradient
        return {"base": lambda: net(**inputs, logits_to_keep=1),
                "full": lambda: token_logprobs(net, {**inputs, "targets": targets}, chunk=0),
                "chunked": lambda: token_logprobs(net, {**inputs, "targets": targets}, chunk)}

    def base():  # the activations, and the head's own gradient where it trains (one position a row reaches it)
        out, hidden = lm_head.forward_hidden(net, batch, targets[:, 1:])
        (hidden.sum() + out.logits.float().sum()).backward()

    return {"base": base, "full": lambda: net(**batch).loss.backward(),
            "chunked": lambda: lm_head.causal_lm_loss(net, batch, chunk=chunk).loss.backward()}


def measure(name: str, reps: int, chunk: int, memory: bool = True) -> dict:
    """A workload's peaks (`memory`) and its steps timed on both paths, `reps` interleaved pairs."""
    lora, rows, length, scored, training = WORKLOADS[name]
    net = _model(lora)
    batch = _batch(net.config.vocab_size, rows, length, scored)
    paths, peak, seconds = _paths(net, batch, training, chunk), {}, {"full": [], "chunked": []}
    with torch.set_grad_enabled(training):
        for step in paths.values():  # the first pass of each allocates what stays (kernels' caches, buffers)
            step()
            net.zero_grad(set_to_none=True)
        for path, step in paths.items() if memory else ():
            with PeakResident() as live:
                step()
            net.zero_grad(set_to_none=True)
            peak[path] = live.peak
        for _ in range(reps):  # interleaved, so both paths share the machine's drift
            for path in ("full", "chunked"):
                t0 = time.perf_counter()
                paths[path]()
                seconds[path].append(time.perf_counter() - t0)
                net.zero_grad(set_to_none=True)
    row = {"workload": name, "chunk": chunk, "lora": lora, "rows": rows, "length": length, "training": training,
           "host": f"{_cpu()}, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
           "allocator": "live" if memory else "glibc", "seconds": seconds}
    if memory:
        terms = {p: (peak[p] - peak["base"]) / GIB for p in ("full", "chunked")}
        row.update(peak_gib={p: round(b / GIB, 4) for p, b in peak.items()},
                   term_gib={p: round(v, 4) for p, v in terms.items()},
                   term_ratio=round(terms["chunked"] / terms["full"], 4))
    return row


def code_commit() -> str:
    """The newest commit that changed the package (what the paths run)."""
    return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "llmkit"], capture_output=True,
                          text=True, check=True).stdout.strip()


def _cpu() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")


def table(rows: list[dict]) -> str:
    import numpy as np

    lines = ["| workload | chunk | term, full logits | chunked | chunked / full | step s, full | chunked | "
             "speed ratio (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "term_gib" in r):
        # timed under glibc's default allocator where measured so (the memory runs' map every tensor: slower)
        r = {**r, **next((t for t in rows if t.get("allocator") == "glibc" and
                          (t["workload"], t["chunk"]) == (r["workload"], r.get("chunk", 1024))), {})}
        speed = np.array(r["seconds"]["full"]) / np.array(r["seconds"]["chunked"])  # > 1: chunked is faster
        median, low, high = median_ratio(speed)
        lines.append(f"| {r['workload']} | {r.get('chunk', 1024)} | {r['term_gib']['full']:.3f} GiB | "
                     f"{r['term_gib']['chunked']:.3f} GiB | {r['term_ratio']:.1%} | "
                     f"{np.median(r['seconds']['full']):.2f} | {np.median(r['seconds']['chunked']):.2f} | "
                     f"{median:.3f} ({low:.3f}-{high:.3f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=lm_head.CHUNK, help="positions projected at once (train.loss_chunk)")
    ap.add_argument("--table", action="store_true", help="print the table of what is measured, run nothing")
    ap.add_argument("--timing", action="store_true", help="time the paths under glibc's default allocator only")
    ap.add_argument("--commit", default=None, help="the table's commit (default: the code's now)")
    args = ap.parse_args()
    if not args.timing and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    commit = (args.commit if args.table else None) or code_commit()  # measured rows: the code's own
    rows = [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.is_file() else []
    rows = [r for r in rows if r.get("commit", "c530620") == commit]
    host = f"{_cpu()}, {os.cpu_count()} cores"
    if args.table:
        print(table([r for r in rows if r["host"] == host]))
        return
    for name in args.workloads:
        kind = "glibc" if args.timing else "live"
        if any((r["workload"], r.get("chunk", 1024), r["host"], r.get("allocator", "live")) == (name, args.chunk, host,
                                                                                               kind) for r in rows):
            continue
        row = {**measure(name, args.reps, args.chunk, memory=not args.timing), "commit": commit}
        with open(OUT, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        said = (f"term {row['term_gib']['full']:.3f} -> {row['term_gib']['chunked']:.3f} GiB ({row['term_ratio']:.1%})"
                if "term_gib" in row else f"seconds {row['seconds']}")
        print(f"{name}: {said}", flush=True)


if __name__ == "__main__":
    main()
