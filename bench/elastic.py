"""Elastic resume of the SmolLM2 asset (issue 19): a full fine-tune on 2 ranks under ZeRO-3, fp32, checkpointed
mid-run, then resumed on 1 rank. Reports the universal conversion's time and size (from the resumed run's log and
the folder it wrote) and the resumed losses against the uninterrupted 2-rank run, step by step.

    .venv/bin/python bench/elastic.py [--steps 6] [--at 3] [--stage 3] [--ranks 2 1]

Writes bench/results/elastic.json; the runs are in bench/results/elastic/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
CONFIG = ROOT / "recipes" / "configs" / "smollm2_full_polarity_text.yaml"


def launch(out: Path, ranks: int, stage: int, steps: int, extra: list[str]) -> str:
    cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"cpu_zero{stage}.yaml"), "--num_processes", str(ranks),
           str(ROOT / "recipes" / "causal_lm.py"), "--config", str(CONFIG), "--train.precision", "fp32",
           "--train.max_steps", str(steps), "--train.per_device_batch_size", "2", "--train.logging_steps", "1",
           "--train.eval_every_steps", "null", "--data.max_length", "128", "--data.max_eval_samples", "16",
           "--train.sample_prompts", "null", "--output.output_dir", str(out), *extra]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{out.name} failed (exit {proc.returncode}); see {out.parent / f'{out.name}.log'}")
    return proc.stdout + proc.stderr


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--at", type=int, default=3, help="the checkpoint's step")
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs=2, default=[2, 1], metavar=("SAVED", "RESUMED"))
    args = ap.parse_args()
    saved, resumed = args.ranks
    if 2 % saved or 2 % resumed:
        sys.exit("--ranks: 1 or 2 each (the global batch is 2 micro-batches)")
    root = OUT / "elastic"
    shutil.rmtree(root, ignore_errors=True)  # fresh runs (a resume must not find an old run in its folder)
    root.mkdir(parents=True)
    straight = root / f"straight-{saved}"
    launch(straight, saved, args.stage, args.steps, ["--checkpoint.save_every_steps", str(args.at),
                                                     "--train.gradient_accumulation_steps", str(2 // saved)])
    ckpt = straight / "checkpoints" / f"step-{args.at}"
    said = launch(root / f"resumed-{resumed}", resumed, args.stage, args.steps,
                  ["--checkpoint.resume_from", str(ckpt), "--train.gradient_accumulation_steps", str(2 // saved)])
    found = re.search(r"converted .* in ([0-9.]+) s", said)
    universal = ckpt / "universal"
    a, b = losses(straight), losses(root / f"resumed-{resumed}")
    result = {
        "stage": args.stage, "saved_ranks": saved, "resumed_ranks": resumed, "checkpoint_step": args.at,
        "conversion_seconds": float(found.group(1)) if found else None,
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*")
                                if p.is_file() and universal not in p.parents),
        "universal_bytes": sum(p.stat().st_size for p in universal.rglob("*") if p.is_file()),
        "losses": {s: {"straight": a[s], "resumed": b[s], "relative_difference": abs(b[s] - a[s]) / abs(a[s])}
                   for s in sorted(b)},
    }
    print(f"ZeRO-{args.stage} {saved} -> {resumed} rank(s), SmolLM2 full fine-tune fp32, checkpoint at step {args.at}")
    print(f"conversion: {result['conversion_seconds']} s; checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB, "
          f"universal copy {result['universal_bytes'] / 2**20:.0f} MiB")
    for s, row in result["losses"].items():
        print(f"step {s}: straight {row['straight']:.6f}  resumed {row['resumed']:.6f}  "
              f"relative difference {row['relative_difference']:.2e}")
    (OUT / "elastic.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
