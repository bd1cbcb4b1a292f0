"""Causal-LM fine-tuning without the full logits (issue 50), before and after on this machine: the shipped SmolLM2
recipes (LoRA label words, full fine-tuning on packed text) on 2 CPU ranks, ZeRO-2 and ZeRO-3, at the recipe's
length and at 4x, each run a few optimizer steps and one evaluation. "before" is a git worktree of --before (the
commit the issue measured, 5c31b18: full logits, peak per rank 3.78 GiB for the label-word recipe on full-length
rows) run with the same Python and overrides; "after" a worktree of --after (default: the newest commit that
changed the code a run executes), so editing this checkout while the bench runs changes neither side. The rows
reach the length: each row is N consecutive polarity sentences joined (bench/memory_predict.py's data, N = 8 or 32).

Per run: each rank's peak memory, the run's real tokens/s over its steps, the estimate it logged. `--allocator
live` (the default: memory) fixes MALLOC_MMAP_THRESHOLD_ so RSS follows live memory (bench/memory_predict.py
explains why); that allocator maps and unmaps every tensor over 64 KiB, which slows a step (the more, the more large
tensors a step makes, so it flatters the side that makes fewer): tokens/s come from `--allocator glibc` runs,
glibc's default, what a CPU run gets. Runs go in interleaved reps (before, after, before, after ...) so that the two
sides share the machine's drift; each appends one JSON line to bench/results/logits_memory.jsonl and a run already
there is skipped. `--table` prints the before/after table: peak per rank (max over the live reps) and the tokens/s
ratio of the glibc reps: the median of the paired ratios with a 95% bootstrap interval (bench/_common.py
median_ratio).

    .venv/bin/python bench/logits_memory.py [--rows lora_zero2 ...] [--reps 1] [--allocator live|glibc] [--steps 6]
    .venv/bin/python bench/logits_memory.py --table
    .venv/bin/python bench/logits_memory.py --session 2026-12-07c --allocator glibc --reps 3 --after 464cac9

`--session TAG` marks the rows a run writes and counts only the timed (glibc) rows so marked, for skipping and for the
table: a fresh set of interleaved reps beside older ones, e.g. after a fix that changed one side's speed. A session
is one pair of commits: adding reps at another --before/--after is refused; `--table --session TAG` pairs that
session's timed rows whatever --after says (the live rows stay --after's) and prints the pair.
    .venv/bin/python bench/logits_memory.py --fit 4.0 [--rows lora_zero2]

`--fit GIB`: the longest data.max_length (a multiple of 64) whose measured peak per rank stays within GIB, before
and after, by bisection over real runs (2 steps and the evaluation each; rows of 256 sentences, ~5,000 tokens, so every
length is reached); each probe is one JSON line ("fit": GIB), reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import median_ratio  # noqa: E402
from memory_predict import long_rows  # noqa: E402  (the rows that reach the length, one reader for both benches)

OUT = ROOT / "bench" / "results" / "logits_memory.jsonl"
GIB = 2**30
# name: (recipe, config, accelerate config, sentences a row, more overrides)
ROWS = {
    "lora_zero2": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero2.yaml", 8, []),
    "lora_zero3": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero3.yaml", 8, []),
    "lora_zero2_4x": ("causal_lm", "sentiment_smollm2_lora.yaml", "cpu_zero2.yaml", 32, ["--data.max_length", "640"]),
    "full_zero2": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero2.yaml", 8,
                   ["--model.gradient_checkpointing", "false"]),
    "full_zero3": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero3.yaml", 8,
                   ["--model.gradient_checkpointing", "false"]),
    "full_zero2_4x": ("causal_lm", "smollm2_full_polarity_text.yaml", "cpu_zero2.yaml", 32,
                      ["--model.gradient_checkpointing", "false", "--data.max_length", "1024",
                       "--train.per_device_batch_size", "1"]),
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc": {}}


def _host() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{cpu}, {os.cpu_count()} cores"


def code_commit() -> str:
    """The newest commit that changed what a run executes (the package, the recipes, the launch configs)."""
    return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "llmkit", "recipes",
                           "accelerate_configs", "ds_configs"], capture_output=True, text=True,
                          check=True).stdout.strip()


def tree(side: str, commit: str) -> Path:
    """The code a side runs: a worktree of its commit (made once)."""
    path = Path(tempfile.gettempdir()) / f"llmkit-{side}-{commit}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", str(path), commit], check=True)
    return path


def run(name: str, side: str, commit: str, steps: int, allocator: str = "live") -> dict:
    recipe, config, accelerate, join, extra = ROWS[name]
    code = tree(side, commit)
    with tempfile.TemporaryDirectory(prefix="llmkit-logits-") as tmp:
        data = long_rows(Path(tmp) / "data", join)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(code / "accelerate_configs" / accelerate), "--main_process_port", "29643",
               str(code / "recipes" / f"{recipe}.py"), "--config", str(code / "recipes" / "configs" / config),
               "--output.output_dir", f"{tmp}/run", "--train.max_steps", str(steps), "--train.logging_steps", "1",
               "--train.eval_every_steps", str(steps), "--data.max_train_samples", "256",
               "--data.max_eval_samples", "32", "--data.test_split", "null", "--output.explain_rows", "0",
               "--output.verify_export", "false", "--train.sample_prompts", "null", "--data.dataset", str(data),
               *extra]
        env = {**ENV, **ALLOCATORS[allocator], "PYTHONPATH": str(code)}
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True,
                              timeout=1800)
        refused = re.search(r"llmkit: error: (this run needs at least .*)", proc.stderr)
        if proc.returncode != 0 and refused:  # its own preflight said it does not fit this machine: a result too
            return {"row": name, "side": side, "commit": commit, "host": _host(), "allocator": allocator,
                    "steps": steps, "refused": refused.group(1), "peak_gib_per_rank": None,
                    "real_tokens_per_second": None, "estimate_gib": None}
        if proc.returncode != 0:
            raise SystemExit(f"{name} ({side}) failed:\n{proc.stderr[-3000:]}")
        said = proc.stdout + proc.stderr
        estimate = re.findall(r"^\s+(?:live|total) at peak\s+(\d+\.\d+) GiB", said, re.M)
        train = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["train"]
    return {"row": name, "side": side, "commit": commit, "host": _host(), "allocator": allocator,
            "steps": steps, "precision": train["precision"], "zero_stage": train["zero_stage"],
            "peak_gib_per_rank": [round(b / GIB, 3) for b in train["per_rank"]["peak_memory_bytes"]],
            "real_tokens_per_second": train.get("real_tokens_per_second"),
            "estimate_gib": float(estimate[-1]) if estimate else None}


def fit(name: str, side: str, commit: str, budget: float, rows: list[dict]) -> int:
    """The longest max_length (64 .. 4096, a multiple of 64) whose peak per rank stays within `budget` GiB."""
    probes = {r["seq"]: r for r in rows if r.get("fit") == budget and (r["row"], r["side"]) == (name, side)}
    low, high = 1, 64  # in units of 64 tokens: low fits (assumed), high is the first not yet known to fail
    while True:
        if high not in probes:
            probes[high] = _probe(name, side, commit, budget, high * 64)
        if _over(probes[high], budget) or high >= 64:
            break
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if mid not in probes:
            probes[mid] = _probe(name, side, commit, budget, mid * 64)
        low, high = (low, mid) if _over(probes[mid], budget) else (mid, high)
    return low * 64


def _probe(name: str, side: str, commit: str, budget: float, seq: int) -> dict:
    recipe, config, accelerate, _, extra = ROWS[name]
    ROWS[f"{name}@{seq}"] = (recipe, config, accelerate, 256, [*extra, "--data.max_length", str(seq)])
    got = run(f"{name}@{seq}", side, commit, 2)
    row = {"row": name, "side": side, "commit": commit, "fit": budget, "seq": seq // 64, "host": got["host"],
           "peak": None if "refused" in got else max(got["peak_gib_per_rank"]),
           **({"refused": got["refused"]} if "refused" in got else {})}
    with open(OUT, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"fit {name} {side}: max_length {seq}: " + (f"peak {row['peak']:.2f} GiB" if row["peak"] is not None
          else "refused by its preflight"), flush=True)
    return row


def _over(probe: dict, budget: float) -> bool:
    """A probe over the budget: its peak above it, or refused by its own preflight (it would not fit)."""
    return probe["peak"] is None or probe["peak"] > budget


def table(rows: list[dict]) -> str:
    import numpy as np

    lines = ["| run | peak per rank, before | after | after / before | after: estimate (measured / estimate) | "
             "tokens/s before | after | ratio (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        mine = [r for r in rows if r["row"] == name]
        got = {side: [r for r in mine if r["side"] == side and r.get("allocator", "live") == "live"]
               for side in ("before", "after")}
        timed = {side: [r for r in mine if r["side"] == side and r.get("allocator") == "glibc"]
                 for side in ("before", "after")}
        if not got["before"] or not got["after"]:
            continue
        if any("refused" in r for r in got["before"] + got["after"]):
            said = {s: "refused by its preflight" if any("refused" in r for r in got[s]) else
                    f"{max(max(r['peak_gib_per_rank']) for r in got[s]):.2f} GiB" for s in got}
            lines.append(f"| {name} | {said['before']} | {said['after']} | | | | | |")
            continue
        peak = {s: max(max(r["peak_gib_per_rank"]) for r in got[s]) for s in got}
        speed = {s: [r["real_tokens_per_second"] for r in timed[s]] for s in timed}
        if not speed["before"] or not speed["after"]:
            lines.append(f"| {name} | {peak['before']:.2f} GiB | {peak['after']:.2f} GiB | "
                         f"{peak['after'] / peak['before']:.2f} | {_judged(got['after'], peak['after'])} | "
                         "not timed | | |")
            continue
        n = min(len(speed["before"]), len(speed["after"]))
        ratios = np.array(speed["after"][:n]) / np.array(speed["before"][:n])
        ci = "n/a (one rep)"
        if n > 1:
            ci = "{:.3f} ({:.3f}-{:.3f})".format(*median_ratio(ratios))
        lines.append(f"| {name} | {peak['before']:.2f} GiB | {peak['after']:.2f} GiB | "
                     f"{peak['after'] / peak['before']:.2f} | {_judged(got['after'], peak['after'])} | "
                     f"{np.median(speed['before']):.0f} | "
                     f"{np.median(speed['after']):.0f} | {ci} |")
    return "\n".join(lines)


def _judged(after: list[dict], peak: float) -> str:
    estimate = after[-1]["estimate_gib"]
    return f"{estimate:.2f} GiB ({peak / estimate:.2f})" if estimate else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="live")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--before", default="5c31b18")
    ap.add_argument("--after", default=None, help="default: the newest commit that changed the code a run executes")
    ap.add_argument("--table", action="store_true", help="print the table of what is measured, run nothing")
    ap.add_argument("--session", help="mark the rows written; count only timed rows so marked")
    ap.add_argument("--fit", type=float, help="GiB per rank: the longest max_length within it, before and after")
    args = ap.parse_args()
    commits = {"before": args.before, "after": args.after or code_commit()}
    rows = [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.is_file() else []
    if args.session and not args.table and not args.fit:
        other = {(r["side"], r["commit"]) for r in rows if r.get("session") == args.session
                 and r.get("commit") != commits[r["side"]]}
        if other:
            sys.exit(f"session {args.session} holds other commits ({sorted(other)}): one pair a session; "
                     "pick a new --session or the same --before/--after")
    # a side's rows: its commit's, on this host (fit probes before --after existed carry no commit: the before side's)
    # a --session's timed rows are its own whatever --after says (a session is one pair of commits, printed below)
    def timed(r: dict) -> bool:
        return args.session is not None and r.get("allocator") == "glibc" and r.get("session") == args.session

    rows = [r for r in rows if r.get("host") == _host() and (r.get("commit", args.before) == commits[r["side"]]
                                                             or (args.table and timed(r)))]
    if args.fit:
        for name in args.rows:
            got = {side: fit(name, side, commits[side], args.fit, rows) for side in ("before", "after")}
            print(f"{name}: the longest max_length within {args.fit} GiB per rank: before {got['before']}, "
                  f"after {got['after']}", flush=True)
        return
    rows = [r for r in rows if "fit" not in r and (args.session is None or r.get("allocator") != "glibc"
                                                     or r.get("session") == args.session)]
    if args.table:
        pairs = sorted({(r["side"] == "after", r["commit"]) for r in rows if timed(r)})
        if pairs:
            print(f"tokens/s: session {args.session}, " + " -> ".join(c for _, c in pairs))
        print(table(rows))
        return
    for rep in range(args.reps):
        for name in args.rows:
            for side in ("before", "after"):
                if len([r for r in rows if (r["row"], r["side"], r.get("allocator", "live"))
                        == (name, side, args.allocator)]) > rep:
                    continue
                row = {**run(name, side, commits[side], args.steps, args.allocator), "rep": rep,
                       **({"session": args.session} if args.session else {})}
                rows.append(row)
                with open(OUT, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{name} {side} rep {rep}: " + (f"refused: {row['refused']}" if "refused" in row else
                      f"peak {max(row['peak_gib_per_rank']):.2f} GiB per rank, {row['real_tokens_per_second']} "
                      "real tokens/s"), flush=True)


if __name__ == "__main__":
    main()
