"""`llmkit assets`: install the offline model and data assets (llmkit.assets does the work; idempotent)."""

from __future__ import annotations

import argparse

from llmkit import assets


def main(_: argparse.Namespace) -> None:
    """`llmkit assets`: every asset installed, or found installed already."""
    assets.install_all()
