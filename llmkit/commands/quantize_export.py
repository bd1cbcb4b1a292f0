"""`llmkit quantize`: quantized copies of any export beside it (llmkit.ship.quantize does the work); for a run's
final/, the run's report is written again to show them."""

from __future__ import annotations

import argparse

from llmkit.data import scored
from llmkit.data.scored import parse_label_map
from llmkit.evals import explain
from llmkit.report import pages
from llmkit.rundir import life
from llmkit.ship import quantize


def main(args: argparse.Namespace) -> None:
    """`llmkit quantize`, from its parsed options: every format checked before the first copy is written."""
    rows = None if args.data is None else {
        "source": args.data, "split": args.split, "label_map": parse_label_map(args.label_map),
        **scored.settings(explain.run_records(args.model_dir)[0].get("data") or {}, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, label_column=args.label_column,
                          max_length=args.max_length)}
    quantize.check(args.model_dir, args.to)
    for name in args.to:
        quantize.quantize(args.model_dir, name, rows, args.max_samples)
    run = args.model_dir.parent
    if args.model_dir.name == "final" and life.is_run(run):
        paths = pages.build([run])
        print(f"report: {paths['html']} (with what each copy costs)")
