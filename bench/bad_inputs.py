"""Run the bad-input battery (tests/bad_inputs.py) and print "N of M bad inputs clean", with what is wrong for
each case that is not, by class. A clean case exits 2 with one `llmkit: error:` line naming the problem, no
traceback and no file changed; a legitimate input passes.

    .venv/bin/python bench/bad_inputs.py [--only data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bad_inputs  # noqa: E402
from helpers import build_tiny_bert, build_tiny_data, build_tiny_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="one class of input (config, deepspeed, accelerate, env, data, ...)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--show", action="store_true", help="print each case's error line")
    args = parser.parse_args()
    cases = [c for c in bad_inputs.CASES if args.only in (None, c.kind)]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "data").mkdir()
        assets = {"bert": build_tiny_bert(root / "bert"), "data": build_tiny_data(root / "data"),
                  "lm": build_tiny_lm(root / "lm")}
        results, per_kind = [], Counter()
        for i, case in enumerate(cases):
            tmp = root / f"case{i}"
            tmp.mkdir()
            got = bad_inputs.run(case, tmp, assets)
            problem = bad_inputs.verdict(case, got)
            results.append({"kind": case.kind, "name": case.name, "clean": problem is None, "problem": problem})
            per_kind[case.kind, problem is None] += 1
            print(f"{'clean' if problem is None else 'NOT  '}  {case.kind:<10} {case.name}"
                  + (f"\n         {problem}" if problem else "")
                  + (f"\n         {got.errors[0] if got.errors else '(no error)'}" if args.show else ""), flush=True)
    clean = sum(r["clean"] for r in results)
    print()
    for kind in dict.fromkeys(c.kind for c in cases):
        print(f"{kind:<10} {per_kind[kind, True]} of {per_kind[kind, True] + per_kind[kind, False]} clean")
    print(f"\n{clean} of {len(results)} bad inputs clean")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
