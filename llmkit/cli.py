"""The `llmkit` command, and the error handling shared by the recipes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from llmkit.errors import LlmkitError


def is_main_rank() -> bool:
    """True on global rank 0 (or outside a launcher), so errors print once."""
    return os.environ.get("RANK", "0") == "0"


def guarded(fn: Callable[[], object]) -> None:
    """Run `fn`; print an LlmkitError as one clear line (no traceback) and exit 2."""
    try:
        fn()
    except LlmkitError as exc:
        if is_main_rank():
            print(f"llmkit: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def recipe_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """`--config FILE` plus `--section.key value` overrides, as the recipes take them."""
    parser = argparse.ArgumentParser(description="llmkit recipe: --config FILE [--section.key VALUE ...]")
    parser.add_argument("--config", help="YAML recipe config")
    args, rest = parser.parse_known_args(argv)
    return args.config, rest


def _assets(_: argparse.Namespace) -> None:
    from llmkit import assets

    assets.install_all()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmkit` console script."""
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("assets", help="install the offline model and data assets (idempotent)").set_defaults(fn=_assets)
    args = parser.parse_args(argv)
    guarded(lambda: args.fn(args))


if __name__ == "__main__":
    main()
