"""`llmkit compare` on the polarity test split (issue 39): the classifiers bench/classifiers.py trained (a: the
MiniLM demo, b: SmolLM2 sequence classifier LoRA, c: SmolLM2 label words LoRA) and the SmolLM2 instruct asset
answering zero-shot with c's prompt template and label words. One `llmkit compare` command, timed as a whole
(every model's load, scoring of the test and validation splits, the statistics, the explanations, the pages).
Goal: under 5 minutes on two cores.

    .venv/bin/python bench/classifiers.py --only a b c        # once: the three runs (about 16 minutes)
    .venv/bin/python bench/compare.py [--max-samples N] [--explain-rows 2] [--precision auto]

Writes bench/results/compare/ (compare.html, .md, .json) and bench/results/compare.json (the wall time, the CPU and
the comparison's table), and prints the table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu  # noqa: E402

from llmkit.report.compared import verdict  # noqa: E402
from llmkit.report.undefined import defined, interval, shown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "classifiers"
TEMPLATE = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}")


def _points(pair: dict, key: str) -> str:
    """A difference in points with its interval, or why either is not defined."""
    v = pair[key]
    return f"{shown(100 * v if defined(v) else v, '+.2f')} ({interval(pair[key + '_ci95'], '+.2f', 100, ' to ')})"


def _table(doc: dict, seconds: float) -> str:
    lines = [f"`llmkit compare` of {len(doc['models'])} models on {doc['models'][0]['rows']} test rows in "
             f"**{seconds:.0f} s** wall (temperatures fitted on {doc['calibration_split']}).", "",
             "| model | accuracy (95% CI) | macro-F1 | ECE | ECE after T (T) | ms per row |",
             "|---|---|---|---|---|---|"]
    for m in doc["models"]:
        t = m.get("temperature") or {}
        after = f"{shown(t.get('ece_after'))} ({shown(t.get('temperature'), '.2f')})" if t else "-"
        lines.append(f"| {m['name']}: {m['label']} | {shown(m['accuracy'])} ({interval(m['accuracy_ci95'])}) | "
                     f"{shown(m['f1_macro'])} | {shown(m['ece'])} | {after} | {1000 * m['seconds_per_row']:.1f} |")
    family = doc.get("multiple_testing") or {}
    lines += ["", "| A vs B | accuracy A - B, points (95% CI) | macro-F1 A - B, points (95% CI) | only A / only B "
              f"right | McNemar exact p | p, {family.get('correction', 'holm')} over {family.get('family', '?')} "
              "pairs | significant at 5% |", "|---|---|---|---|---|---|---|"]
    for p in doc["pairs"]:
        if "error" in p:
            lines.append(f"| {p['a']} vs {p['b']} | {p['error']} | | | | | |")
            continue
        lines.append(f"| {p['a']} vs {p['b']} | {_points(p, 'accuracy_difference')} | "
                     f"{_points(p, 'f1_macro_difference')}"
                     f" | {p['only_a_right']} / {p['only_b_right']} | {shown(p['mcnemar_exact_p'], '.3g')} | "
                     f"{shown(p.get('mcnemar_p_holm'), '.3g')} | {'yes' if p['significant'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=RUNS, help="bench/classifiers.py's runs (a, b, c) and data/")
    ap.add_argument("--max-samples", type=int, help="fewer test rows, for a quick try")
    ap.add_argument("--explain-rows", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="each model's scoring: auto = bf16 where the CPU has it")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare")
    args = ap.parse_args()
    models = [args.runs / name for name in ("a", "b", "c")]
    missing = [str(m) for m in models if not (m / "final").is_dir()]
    if missing:
        sys.exit(f"no finished run in {', '.join(missing)}: run `.venv/bin/python bench/classifiers.py --only a b c` "
                 "first")
    cmd = [str(ROOT / ".venv" / "bin" / "llmkit"), "compare", *map(str, models), "zero-shot:asset:smollm2",
           "--data", str(args.runs / "data" / "balanced"), "--split", "test", "--output", str(args.out),
           "--prompt-template", TEMPLATE, "--label-words", "negative", "positive", "--explain-rows",
           str(args.explain_rows), "--max-length", "160", "--precision", args.precision]
    cmd += ["--max-samples", str(args.max_samples)] if args.max_samples else []
    if args.out.exists():  # the previous comparison: compare writes over its own folder
        print(f"replacing {args.out}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"llmkit compare failed (exit {proc.returncode})")
    doc = json.loads((args.out / "compare.json").read_text())
    table = _table(doc, seconds)
    (ROOT / "bench" / "results" / "compare.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "cpu": cpu(), "command": cmd, "table": table,
         "verdict": verdict(doc)}, indent=2) + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
