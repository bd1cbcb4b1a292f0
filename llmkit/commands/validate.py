"""`llmkit validate`: the recipe's pre-training checks (preflight), for the Accelerate config it will be launched
with, then its tokenizer and data; nothing is written."""

from __future__ import annotations

import argparse

from llmkit.config import load_config
from llmkit.launch import parallel, preflight


def validate(config_path: str, overrides: list[str], accelerate_config: str | None, recipe: str | None = None,
             log=print) -> None:
    """Every check a recipe makes before its first training step, in order; stops at the first problem (raised
    as LlmkitError)."""
    cfg = load_config(config_path, overrides)
    log(f"ok  config: {config_path} (schema, types, ranges)")
    for line in preflight.warnings(cfg):
        log(line)

    def passed(line: str) -> None:
        log(f"ok  {line}")

    env = parallel.accelerate_env(accelerate_config) if accelerate_config else {}
    with parallel.environ(env):
        plan = preflight.check(cfg, parallel.world_size(), recipe, say=passed)
    preflight.check_inputs(cfg, plan, say=passed)
    log("all checks passed")


def main(args: argparse.Namespace) -> None:
    """`llmkit validate CONFIG [--section.key value ...]`, from its parsed options and the overrides after them."""
    validate(args.config, args.overrides, args.accelerate_config, args.recipe)
