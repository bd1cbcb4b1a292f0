"""Training throughput of the sentiment recipe (MiniLM asset, polarity train split, the recipe's
hyperparameters and precision), side by side and interleaved (A B C D A B C D ...), medians and ratios:

  llmkit          recipes/classification.py (length-grouped batches, dynamic padding)
  trainer_best    HF Trainer with dynamic padding and group_by_length (1 process)
  trainer_glue    HF Trainer at transformers' run_glue.py defaults: rows padded to 128 (1 process)
  hand_loop       a minimal hand-written Accelerate loop over llmkit's batches: the overhead floor

With --ranks 2 only llmkit and hand_loop run, both under `accelerate launch` with ZeRO-2 on 2 CPU ranks.
Each runner times its training steps only (not model loading, tokenization or evaluation). `--variant
NAME='--train.key value ...'` adds llmkit runs with those overrides (before/after comparisons of one switch,
interleaved with the rest). `--only` limits the runners. Writes bench/results/throughput_<ranks>.json.

    .venv/bin/python bench/throughput.py [--ranks 1|2] [--steps 60] [--reps 3] \
        [--variant foreach='--train.adamw_impl foreach'] [--only llmkit hand_loop]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RECIPE = ROOT / "recipes" / "configs" / "sentiment_minilm_polarity.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(BENCH)}


def _launch(script: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_zero2.yaml"), *script]


def run_once(name: str, steps: int, ranks: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if name.startswith("llmkit"):
            cmd = _launch([str(ROOT / "recipes" / "classification.py"), "--config", str(RECIPE),
                           "--train.max_steps", str(steps), "--train.logging_steps", str(steps),
                           "--data.max_eval_samples", "16", "--data.test_split", "null",
                           "--output.output_dir", f"{tmp}/run", *overrides], ranks)
        elif name == "hand_loop":
            cmd = _launch([str(BENCH / "_hand_loop.py"), "--steps", str(steps)], ranks)
        else:
            cmd = [sys.executable, str(BENCH / "_trainer.py"), "--mode", name.split("_")[1], "--steps", str(steps),
                   "--out", tmp]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        if name.startswith("llmkit"):
            s = json.loads(Path(f"{tmp}/run/metrics.json").read_text())["train"]
            return {"samples_per_second": s["samples_per_second"], "real_tokens_per_second":
                    s["real_tokens_per_second"], "seconds": s["step_seconds"], "precision": s["precision"]}
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, choices=[1, 2], default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME='--k v ...'",
                    help="an extra llmkit runner with these config overrides")
    ap.add_argument("--only", nargs="+", help="run only these runners (e.g. llmkit hand_loop llmkit[foreach])")
    args = ap.parse_args()
    names = ["llmkit", "trainer_best", "trainer_glue", "hand_loop"] if args.ranks == 1 else ["llmkit", "hand_loop"]
    overrides = {n: [] for n in names}
    for variant in args.variant:
        label, _, extra = variant.partition("=")
        overrides[f"llmkit[{label}]"] = shlex.split(extra)
    names = [n for n in overrides if not args.only or n in args.only]
    if "llmkit" not in names:
        raise SystemExit("--only must keep llmkit: the ratios are against it")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:  # interleaved, so drift in machine speed hits every runner alike
            runs[name].append(run_once(name, args.steps, args.ranks, overrides[name]))
            print(f"rep {rep + 1} {name}: {runs[name][-1]['samples_per_second']:.1f} samples/s", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("samples_per_second", "real_tokens_per_second")}
           for n, rs in runs.items()}
    base = med["llmkit"]["samples_per_second"]
    print(f"\n{args.ranks} rank(s), {args.steps} steps, {args.reps} interleaved reps, precision "
          f"{runs['llmkit'][0]['precision']} (medians)")
    print(f"{'runner':<22}{'samples/s':>12}{'real tok/s':>12}{'llmkit / this':>15}")
    for n in names:
        print(f"{n:<22}{med[n]['samples_per_second']:>12.1f}{med[n]['real_tokens_per_second']:>12.0f}"
              f"{base / med[n]['samples_per_second']:>15.3f}")
    if "hand_loop" in med:
        overhead = med["hand_loop"]["samples_per_second"] / base - 1
        print(f"llmkit overhead vs the hand-written loop: {overhead:+.1%}")
    out = {"ranks": args.ranks, "steps": args.steps, "reps": args.reps, "overrides": overrides, "runs": runs,
           "medians": med}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / f"throughput_{args.ranks}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
