"""What quantization costs on the task (issue 38): `llmkit quantize` of the MiniLM demo export (onnx-int8) and
the SmolLM2 label-word LoRA export (gguf-q8_0, gguf-f16, torchao-int8), each scored against the full model on the
polarity test split by the fresh process `llmkit quantize` starts. Goals: the int8 classifier at least 2x
smaller and 1.5x faster per row on CPU, losing at most 0.5 accuracy points; GGUF Q8_0 perplexity within 1% of
the full model's.

    .venv/bin/python bench/classifiers.py --only a c       # once: the two runs
    .venv/bin/python bench/compression.py [--again]

One JSON line per copy in bench/results/compression.jsonl (a copy already measured is skipped unless --again);
prints the table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "classifiers"
OUT = ROOT / "bench" / "results" / "compression.jsonl"
LABEL_WORDS = "SmolLM2 label words, LoRA (merged)"
COPIES = [("a", "MiniLM demo (full fine-tune)", "onnx-int8"), ("c", LABEL_WORDS, "gguf-q8_0"),
          ("c", LABEL_WORDS, "gguf-f16"), ("c", LABEL_WORDS, "torchao-int8")]


def _done() -> dict:
    if not OUT.is_file():
        return {}
    return {(r["run"], r["format"]): r for r in map(json.loads, OUT.read_text().splitlines())}


def _row(r: dict) -> str:
    n, f, q = r["numbers"], r["numbers"]["full"], r["numbers"]["copy"]
    acc = f"{f['accuracy']:.4f} -> {q['accuracy']:.4f} ({100 * n['accuracy_change']:+.2f} pts)"
    ppl = f"{f['perplexity']:.4f} -> {q['perplexity']:.4f} ({100 * n['perplexity_change']:+.2f}%)" \
        if "perplexity" in q else "-"
    # a GGUF's speed is its runtime's (llama.cpp), which is not what reads it back here
    speed = f"{n['speedup_batch_1']:.2f}x / {n['speedup_batch_32']:.2f}x" if "speedup_batch_1" in n else "-"
    return (f"| {r['what']} | {r['format']} | {f['bytes'] / 2**20:.1f} MiB -> {q['bytes'] / 2**20:.1f} MiB "
            f"({n['size_ratio']:.2f}x; {n['size_ratio_to_fp32']:.2f}x of fp32) | {acc} | "
            f"{100 * (n['f1_macro_change']):+.2f} pts | {n['agreement']:.4f} | {ppl} | {speed} | {r['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--again", action="store_true", help="measure the copies already in the results again")
    args = ap.parse_args()
    done = {} if args.again else _done()
    for run, what, fmt in COPIES:
        if (run, fmt) in done:
            print(f"{run} {fmt}: measured already (--again to redo)", flush=True)
            continue
        final = RUNS / run / "final"
        if not final.is_dir():
            sys.exit(f"no finished run in {final.parent}: run `.venv/bin/python bench/classifiers.py --only a c` first")
        start = time.perf_counter()
        proc = subprocess.run([str(ROOT / ".venv" / "bin" / "llmkit"), "quantize", str(final), "--to", fmt], cwd=ROOT)
        if proc.returncode:
            sys.exit(f"llmkit quantize {final} --to {fmt} failed (exit {proc.returncode})")
        numbers = json.loads((RUNS / run / f"final-{fmt}" / "quantized.json").read_text())
        with OUT.open("a") as fh:
            fh.write(json.dumps({"run": run, "what": what, "format": fmt, "seconds": time.perf_counter() - start,
                                 "cpu": cpu(), "date": time.strftime("%Y-%m-%d"), "numbers": numbers}) + "\n")
    rows = _done()
    print("\n| model | copy | size (ratio to the export as saved; to fp32) | test accuracy | macro-F1 | agreement | "
          "perplexity (gold label words) | speed-up per row, batch 1 / 32 | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, _, fmt in COPIES:
        if (run, fmt) in rows:
            print(_row(rows[(run, fmt)]))


if __name__ == "__main__":
    main()
