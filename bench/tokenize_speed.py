"""Data-pipeline throughput (rows/s) of llmkit's real preparation path, cold and from the datasets cache:

  classifier      llmkit.data.classification.prepare, sentiment_minilm_polarity.yaml, MiniLM tokenizer
  lm_labels       llmkit.data.lm.prepare, sentiment_smollm2_lora.yaml (prompt -> label word), SmolLM2 tokenizer
  lm_packed       llmkit.data.lm.prepare, smollm2_full_polarity_text.yaml (plain text packed into blocks)

Each measurement is a fresh process whose HF_DATASETS_CACHE is a temporary folder: "cold" starts it empty
(json -> arrow, filter, clean, shuffle, tokenize all run), "cached" is a second process on the folder the cold
one filled, where every Dataset.map is served from its cache file. Only the prepare call is timed (imports,
config and tokenizer loading are not); the process wall time is reported next to it. Rows = the rows of every
split the config names (prepare handles all of them). Interleaved reps, medians. Writes
bench/results/tokenize_speed.json.

    .venv/bin/python bench/tokenize_speed.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CONFIGS = ROOT / "recipes" / "configs"
PATHS = {"classifier": "sentiment_minilm_polarity.yaml", "lm_labels": "sentiment_smollm2_lora.yaml",
         "lm_packed": "smollm2_full_polarity_text.yaml"}
# TOKENIZERS_PARALLELISM is left as a real run has it (unset: the Rust tokenizer may use both cores)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def child(name: str) -> None:
    """One prepare call, timed; prints one RESULT line."""
    from llmkit import model
    from llmkit.config import load_config
    from llmkit.data import classification, lm, sources

    cfg = load_config(CONFIGS / PATHS[name])
    tokenizer = model.load_tokenizer(cfg.model)
    prepare = classification.prepare if name == "classifier" else lm.prepare
    start = time.perf_counter()
    prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=lambda m: None)
    seconds = time.perf_counter() - start
    raw = sources.load_raw(cfg.data)  # untimed: the row count of the splits prepare read
    rows = sum(len(raw[split]) for split in sources.wanted_splits(cfg.data, raw).values())
    print("RESULT " + json.dumps({"rows": rows, "seconds": seconds}), flush=True)


def cache_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run_once(name: str, cache: str) -> dict:
    before = cache_files(cache)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name], cwd=ROOT, capture_output=True, text=True,
                          env={**ENV, "HF_DATASETS_CACHE": cache})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    # a cached run that writes new cache files missed the cache somewhere (e.g. an unstable map fingerprint)
    return {**out, "rows_per_second": out["rows"] / out["seconds"], "process_seconds": wall,
            "new_cache_files": cache_files(cache) - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    runs: dict[str, dict[str, list[dict]]] = {n: {"cold": [], "cached": []} for n in PATHS}
    for rep in range(args.reps):
        for name in PATHS:  # interleaved, so drift in machine speed hits every path alike
            with tempfile.TemporaryDirectory(prefix=f"bench-tok-{name}-") as cache:
                for kind in ("cold", "cached"):
                    runs[name][kind].append(run_once(name, cache))
            cold, cached = runs[name]["cold"][-1], runs[name]["cached"][-1]
            print(f"rep {rep + 1} {name}: cold {cold['rows_per_second']:.0f} rows/s, cached "
                  f"{cached['rows_per_second']:.0f} rows/s ({cached['new_cache_files']} new cache files)", flush=True)
    med = {n: {kind: {k: statistics.median(r[k] for r in rs)
                      for k in ("rows_per_second", "seconds", "process_seconds", "new_cache_files")}
               for kind, rs in by_kind.items()} for n, by_kind in runs.items()}
    print(f"\nprepare() on all splits, {args.reps} interleaved reps, fresh process each (medians)")
    print(f"{'path':<12}{'rows':>7}{'cold rows/s':>13}{'cached rows/s':>15}{'speedup':>9}"
          f"{'cold s':>8}{'cached s':>10}{'process s cold/cached':>23}")
    for n in PATHS:
        c, w = med[n]["cold"], med[n]["cached"]
        print(f"{n:<12}{runs[n]['cold'][0]['rows']:>7}{c['rows_per_second']:>13.0f}{w['rows_per_second']:>15.0f}"
              f"{w['rows_per_second'] / c['rows_per_second']:>8.1f}x{c['seconds']:>8.2f}{w['seconds']:>10.2f}"
              f"{c['process_seconds']:>11.1f} / {w['process_seconds']:.1f}")
    for n in PATHS:
        if med[n]["cached"]["new_cache_files"]:
            print(f"note: {n}'s cached run still wrote {med[n]['cached']['new_cache_files']:.0f} cache files "
                  "(a map was recomputed)")
    out = {"reps": args.reps, "configs": PATHS, "runs": runs, "medians": med}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "tokenize_speed.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
