"""`llmkit config`: every config key with its type, default and meaning, or a commented starter YAML
(llmkit.config.docs does the work)."""

from __future__ import annotations

import argparse

from llmkit.config import docs


def main(args: argparse.Namespace) -> None:
    """`llmkit config`: the listing, or with --write the starter YAML for --recipe."""
    if args.write:
        docs.write(args.write, args.recipe)
    else:
        print(docs.listing(), end="")
