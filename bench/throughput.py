"""Training throughput at equal work: every runner trains one epoch over the same rows (the first `--rows` of the
sentiment recipe's shuffled polarity train split: MiniLM asset, the recipe's hyperparameters and precision), in
interleaved reps (A B C D A B C D ...); the table gives each runner's time for that epoch (median, min-max),
samples/s and real tokens/s (the subset's tokens, the same for all), and llmkit's speed-up over it with a 95%
bootstrap interval over the paired reps (scipy.stats.bootstrap):

  llmkit          recipes/classification.py (length-grouped batches, dynamic padding)
  trainer_best    HF Trainer with dynamic padding and group_by_length
  trainer_glue    HF Trainer at transformers' run_glue.py defaults: rows padded to 128 (1 process only)
  hand_loop       a minimal hand-written Accelerate loop over llmkit's batches: the overhead floor

With --ranks 2 the runners go under `accelerate launch` with ZeRO-2 on 2 CPU ranks; Trainer gets the DeepSpeed
JSON llmkit resolves for the run (the same buckets). Each runner times its training steps only (not model
loading, tokenization or evaluation). `--variant NAME='--train.key value ...'` adds llmkit runs with those
overrides. Writes bench/results/throughput_<ranks>.json (with this CPU's model and flags).

    .venv/bin/python bench/throughput.py [--ranks 1|2] [--rows 512] [--reps 5] [--only llmkit hand_loop] \
        [--variant foreach='--train.adamw_impl foreach']
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import RECIPE, ROOT, cpu, model_overrides, recipe, tokenized_train  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(BENCH)}


def _launch(script: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_zero2.yaml"), *script]


def _deepspeed_json(rows: int, out: Path) -> Path:
    """The DeepSpeed config llmkit resolves for this run (2 ranks, ZeRO-2), "auto" left only where Trainer
    fills in its own batch and optimizer values."""
    from llmkit import model
    from llmkit.launch import parallel
    from llmkit.launch.precision import resolve_precision

    cfg = recipe("--data.max_train_samples", str(rows), "--deepspeed.config_file",
                 str(ROOT / "ds_configs" / "zero2.json"))
    precision, _ = resolve_precision(cfg.train.precision)
    ds = parallel.resolve_deepspeed(cfg, precision, 2, model.hidden_size(model.read_config(cfg.model)))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        ds[key] = "auto"
    out.write_text(json.dumps(ds))
    return out


def run_once(name: str, rows: int, ranks: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if name.startswith("llmkit"):
            cmd = _launch([str(ROOT / "recipes" / "classification.py"), "--config", str(RECIPE),
                           "--data.max_train_samples", str(rows), "--train.epochs", "1", "--train.max_steps", "null",
                           "--train.logging_steps", "1000", "--data.max_eval_samples", "16",
                           "--data.test_split", "null", "--output.explain_rows", "0",
                           "--output.verify_export", "false", "--output.output_dir", f"{tmp}/run",
                           *model_overrides(), *overrides],
                          ranks)
        elif name == "hand_loop":
            cmd = _launch([str(BENCH / "_hand_loop.py"), "--rows", str(rows)], ranks)
        else:
            extra = ["--deepspeed", str(_deepspeed_json(rows, Path(tmp) / "ds.json"))] if ranks == 2 else []
            cmd = _launch([str(BENCH / "_trainer.py"), "--mode", name.split("_")[1], "--rows", str(rows),
                           "--out", tmp, *extra], ranks)
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        if name.startswith("llmkit"):
            s = json.loads(Path(f"{tmp}/run/metrics.json").read_text())["train"]
            return {"seconds": s["step_seconds"], "rows": s["train_examples"], "precision": s["precision"]}
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])


def subset_tokens(rows: int) -> int:
    """Real tokens in one epoch of the subset: each row once, truncated at data.max_length, as every runner
    tokenizes it."""
    from transformers import AutoTokenizer

    from llmkit import model

    cfg = recipe("--data.max_train_samples", str(rows))
    tok = AutoTokenizer.from_pretrained(model.locate(cfg.model.name_or_path, "model"))
    return sum(len(ids) for ids in tokenized_train(cfg, tok)["input_ids"])


def speedup_interval(llmkit: list[float], other: list[float]) -> tuple[float, float]:
    """95% bootstrap interval of median(other seconds) / median(llmkit seconds) over the paired reps (a rep runs
    every runner back to back, so machine drift hits a pair alike)."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(llmkit) < 3:
        return float("nan"), float("nan")
    res = bootstrap((llmkit, other), lambda a, b, axis=-1: np.median(b, axis=axis) / np.median(a, axis=axis),
                    paired=True, vectorized=True, method="percentile", n_resamples=2000, random_state=0)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, choices=[1, 2], default=1)
    ap.add_argument("--rows", type=int, default=512, help="the subset: one epoch over it is the work")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME='--k v ...'",
                    help="an extra llmkit runner with these config overrides")
    ap.add_argument("--only", nargs="+", help="run only these runners (e.g. llmkit hand_loop llmkit[foreach])")
    ap.add_argument("--out", type=Path, help="default: bench/results/throughput_<ranks>.json")
    args = ap.parse_args()
    names = ["llmkit", "trainer_best", "trainer_glue", "hand_loop"] if args.ranks == 1 else \
        ["llmkit", "trainer_best", "hand_loop"]
    overrides = {n: [] for n in names}
    for variant in args.variant:
        label, _, extra = variant.partition("=")
        overrides[f"llmkit[{label}]"] = shlex.split(extra)
    names = [n for n in overrides if not args.only or n in args.only]
    if "llmkit" not in names:
        raise SystemExit("--only must keep llmkit: the ratios are against it")
    tokens = subset_tokens(args.rows)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:  # interleaved, so drift in machine speed hits every runner alike
            runs[name].append(run_once(name, args.rows, args.ranks, overrides[name]))
            print(f"rep {rep + 1} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    base = [r["seconds"] for r in runs["llmkit"]]
    table = {}
    for n, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        low, high = speedup_interval(base, secs)
        table[n] = {"seconds_median": med, "seconds_min": min(secs), "seconds_max": max(secs),
                    "samples_per_second": args.rows / med, "real_tokens_per_second": tokens / med,
                    "rows_trained": sorted({r["rows"] for r in rs}),
                    "llmkit_speedup": med / statistics.median(base), "speedup_ci95": [low, high]}
    machine = cpu()
    print(f"\n{args.ranks} rank(s), one epoch of {args.rows} rows ({tokens} real tokens), {args.reps} interleaved "
          f"reps, precision {runs['llmkit'][0]['precision']}, {machine['model']} ({', '.join(machine['flags'])})")
    print("| runner | epoch seconds, median (min-max) | samples/s | real tokens/s | llmkit speed-up (95% CI) |")
    print("|---|---|---|---|---|")
    for n, row in table.items():
        print(f"| {n} | {row['seconds_median']:.2f} ({row['seconds_min']:.2f}-{row['seconds_max']:.2f}) | "
              f"{row['samples_per_second']:.1f} | {row['real_tokens_per_second']:.0f} | {row['llmkit_speedup']:.3f} "
              f"({row['speedup_ci95'][0]:.3f}-{row['speedup_ci95'][1]:.3f}) |")
    out = args.out or BENCH / "results" / f"throughput_{args.ranks}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"ranks": args.ranks, "rows": args.rows, "tokens": tokens, "reps": args.reps,
                               "cpu": machine, "overrides": overrides, "runs": runs, "table": table}, indent=2)
                   + "\n")


if __name__ == "__main__":
    main()
