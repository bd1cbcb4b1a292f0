"""`llmkit report`: the evaluation report (html, md, json) of one or more runs or `llmkit eval` outputs
(llmkit.report.pages does the work)."""

from __future__ import annotations

import argparse

from llmkit.report import pages


def main(args: argparse.Namespace) -> None:
    """`llmkit report`, from its parsed options: where the report went."""
    paths = pages.build(args.run_dirs, args.output, args.overwrite)
    print(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})")
