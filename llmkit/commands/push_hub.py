"""`llmkit push`: a run's export, report and model card to the Hugging Face Hub (llmkit.ship.hub does the work)."""

from __future__ import annotations

import argparse

from llmkit.ship import hub


def main(args: argparse.Namespace) -> None:
    """`llmkit push`, from its parsed options: private unless --public."""
    hub.push(args.run_dir, args.repo_id, private=not args.public, revision=args.revision,
             push_merged=args.merged, dry_run=args.dry_run, staging=args.output, overwrite=args.overwrite)
