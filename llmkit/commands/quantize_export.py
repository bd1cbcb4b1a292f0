"""`llmkit quantize`: quantized copies of any export beside it (llmkit.ship.quantize does the work); for a run's
final/, the run's report is written again to show them."""

from __future__ import annotations

import argparse

from llmkit.data import scored
from llmkit.data.scored import parse_label_map
from llmkit.exported.opened import open_export
from llmkit.report import pages
from llmkit.rundir import life
from llmkit.rundir.layout import RunDir
from llmkit.ship import quantize


def main(args: argparse.Namespace) -> None:
    """`llmkit quantize`, from its parsed options: every format checked before the first copy is written."""
    opened = open_export(args.model_dir)
    rows = None if args.data is None else {
        "source": args.data, "split": args.split, "label_map": parse_label_map(args.label_map),
        **scored.settings(opened.data, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, label_column=args.label_column,
                          max_length=args.max_length)}
    quantize.check(args.model_dir, args.to)
    for name in args.to:
        quantize.quantize(args.model_dir, name, rows, args.max_samples)
    if opened.run is not None and life.is_run(RunDir(opened.run)):  # a run's final/: its report shows the copies
        paths = pages.build([opened.run])
        print(f"report: {paths['html']} (with what each copy costs)")
