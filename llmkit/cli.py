"""The `llmkit` command: its parser as a table (each command's name, help, handler and options; the options several
commands share are written once, in llmkit.commands.options), and `main`, which builds it and runs the command's
handler, a function of a module in llmkit/commands/, under `guarded`. That module is imported only when its command
runs, so `llmkit --help` and `llmkit assets` start without torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from llmkit import fresh  # fresh.absolute: every folder argument, as some work on it runs in a fresh process
from llmkit.commands import options as shared  # the options several commands share, written once
from llmkit.commands.entry import guarded
from llmkit.commands.options import opt


class Command(NamedTuple):
    """One row of the table: a subcommand of `llmkit`."""

    name: str
    help: str
    handler: str  # "module:function" of llmkit.commands, called with the parsed options (launch: with its argv)
    options: tuple = ()
    overrides: bool = False  # further --section.key value arguments override the config


COMMANDS = [
    Command("launch", "accelerate launch with the same arguments; a user error exits 2 with its one line, without the "
            "launcher's traceback", "launcher:launch"),
    Command("assets", "install the offline model and data assets (idempotent)", "install_assets:main"),
    Command("estimate-memory", "per-device memory of a run at these settings: the estimate its preflight makes and "
            "checks (ZeRO formulas, DeepSpeed's peak, activations)", "estimate_memory:main", shared.ESTIMATE_MEMORY),
    Command("generate", "complete prompts with an exported causal LM (full, merged or adapter)", "generate_text:main", (
        opt("model_dir", type=fresh.absolute, help="a run's final/ folder, a merged or full model folder, or a LoRA "
            "adapter"),
        opt("--prompt", action="append", required=True, help="repeat for several prompts"),
        opt("--max-new-tokens", type=int, default=64),
        opt("--chat", choices=["auto", "on", "off"], default="auto", help="wrap the prompt in the chat template "
            "(auto: when the tokenizer has one)"),
        opt("--temperature", type=float, default=0.0, help="0 = greedy"), opt("--top-p", type=float, default=1.0),
        opt("--seed", type=int, default=0),
        opt("--base", help="base model of an adapter (default: from adapter_config.json)"), shared.TRUST)),
    Command("report", "evaluation report (html, md, json) of one or more runs (classifiers or language models)",
            "report_runs:main", (
        opt("run_dirs", nargs="+", type=fresh.absolute, help="run output directories (or `llmkit eval` outputs)"),
        opt("--output", type=fresh.absolute, help="where the report goes (default: the run directory; required for "
            "several)"), shared.OVERWRITE)),
    Command("compare", "score exported classifiers (and llmkit label-word LMs) on the same rows; per pair the "
            "differences with bootstrap confidence intervals and McNemar's exact test", "compare:main", (
        opt("models", nargs="+", type=shared.model_spec, help="two or more classifier folders (e.g. <run>/final), or "
            "zero-shot:<causal LM folder or asset:name>"),
        opt("--output", type=fresh.absolute, required=True, help="the comparison's folder"), shared.OVERWRITE,
        *shared.scored_rows(), shared.PRECISION, opt("--split", default="test", help="the rows every model scores"),
        opt("--calibration-split", help="the split each model's temperature is fitted on (default: validation where "
            "the data has it; none: no temperature)"),
        opt("--slice-by", nargs="+", help="data columns whose values cut the rows into more slices"),
        opt("--explain-rows", type=int, default=2, help="per pair, the most confident disagreements explained word "
            "by word (0: none)"),
        opt("--resamples", type=int, default=2000, help="paired-bootstrap resamples"),
        opt("--seed", type=int, default=0, help="the bootstrap's seed"), *shared.ZERO_SHOT)),
    Command("eval", "evaluate an exported sequence classifier (or an llmkit label-word causal LM) on a labelled split, "
            "with a report", "eval_model:main", (
        opt("model_dir", type=shared.model_or_asset, help="a classifier folder, e.g. <run>/final (any transformers "
            "classifier)"),
        opt("--output", type=fresh.absolute, help="output folder (default: <model_dir>/eval-<split>)"),
        shared.OVERWRITE, *shared.scored_rows(), shared.PRECISION,
        opt("--split", nargs="+", default=["test"], help="the split(s) to score, each its own predictions file"),
        opt("--keep-columns", nargs="+", default=[], help="more columns of the first --split copied into its "
            "prediction rows"), shared.TRUST,
        opt("--zero-shot", action="store_true", help="model_dir is any causal LM (a folder or asset:<name>) scoring "
            "--label-words after --prompt-template, untrained for the task"), *shared.ZERO_SHOT)),
    Command("push", "push a run's export, report and model card to the Hugging Face Hub", "push_hub:main", (
        opt("run_dir", type=fresh.absolute, help="a run output directory (with final/) or its final/ folder"),
        opt("repo_id", help="<user or org>/<name>"),
        opt("--private", action="store_true", help="a private repo (the default)", one_of="visibility"),
        opt("--public", action="store_true", help="a public repo", one_of="visibility"),
        opt("--revision", help="branch to push to (created if missing; default main)"),
        opt("--merged", action="store_true", help="LoRA runs: also push the merged model (merged/)"),
        opt("--dry-run", action="store_true", help="write exactly the folder that would be uploaded, list it, touch "
            "no network"),
        opt("--output", type=fresh.absolute, help="--dry-run: where the folder goes (default <run_dir>/hub_upload)"),
        shared.OVERWRITE)),
    Command("validate", "run every check of a recipe that needs no training, then stop", "validate:main", (
        opt("config", help="the recipe YAML"),
        opt("--accelerate-config", help="the Accelerate yaml you will launch with (processes, DeepSpeed)"),
        opt("--recipe", choices=shared.RECIPES, help="the recipe you will run (default: causal_lm for a causal LM or "
            "prompt/chat data)")), overrides=True),
    Command("explain", "each word's attribution toward every label of an exported classifier or label-word causal LM "
            "(integrated gradients)", "explain_texts:main", (
        opt("model_dir", type=fresh.absolute, help="a run's final/ folder (or any saved sequence classifier or causal "
            "LM)"),
        opt("--text", action="append", help="a text to explain (repeatable)"),
        opt("--file", help="a file of texts, one per line"),
        opt("--text-pair", help="the second text of a text-pair classifier, the same for every text"),
        opt("--prompt-template", help="a causal LM's prompt with {text} (default: the run's data.prompt_template, "
            "from training_config.yaml beside the model)"),
        opt("--label-words", nargs="+", help="a causal LM's label words, in label order (default: the run's)"),
        opt("--max-length", type=int, help="the longest prompt in tokens (default: the run's data.max_length)"),
        opt("--steps", type=int, default=16, help="integration steps to start at (more: smaller delta, slower); a "
            "text whose delta is over 5%% of what it explains is redone with twice as many"),
        opt("--max-steps", type=int, default=256, help="the most steps a text is raised to; a text still over 5%% "
            "there is flagged (--max-steps equal to --steps: never raised)"), shared.TRUST)),
    Command("quantize", "quantized copies of an export beside it (e.g. final-onnx-int8/), each scored against the full "
            "model (a GGUF by transformers' GGUF reader, not llama.cpp)", "quantize_export:main", (
        opt("model_dir", type=fresh.absolute, help="an exported model folder, e.g. <run>/final"),
        opt("--to", nargs="+", required=True, help="onnx-int8 (classifiers), gguf-f16, gguf-q8_0 (Llama LMs), "
            "torchao-int8 (causal LMs)"), *shared.scored_rows(required=False),
        opt("--split", default="test", help="with --data: the split the copies are scored on"))),
    Command("config", "every config key with its type, default and meaning; or write a starter YAML (--write)",
            "config_keys:main", (
        opt("--write", metavar="FILE", help="write a commented starter YAML of every key the recipe reads"),
        opt("--recipe", choices=shared.RECIPES, default="classification", help="the recipe the starter is for "
            "(default: classification)"))),
    Command("train", "run a recipe under accelerate launch from any folder, each file a path or a name llmkit ships; "
            "any further --section.key value overrides the config", "launcher:train", (
        opt("recipe", help="classification, causal_lm, or a recipe script"),
        opt("--config", help="the recipe config: a YAML file or a shipped config's name"),
        opt("--accelerate-config", help="a file or a shipped name, e.g. cpu_zero2 (default: Accelerate's own)"),
        *shared.LAUNCHER), overrides=True),
    Command("recipes", "the recipes, recipe configs, Accelerate and DeepSpeed configs llmkit ships, by name",
            "launcher:recipes"),
    Command("check-numerics", "a few optimizer steps as configured (launcher, ranks, ZeRO, precision, accumulation) "
            "against the same steps in one fp32 process: loss, gradient norm, LR and every parameter within the "
            "precision's tolerances, or exit 1 naming the step and parameters", "check_numerics:main", (
        *shared.configured_run("a file or a shipped name, e.g. cpu_zero2"),
        opt("--steps", type=int, default=4, help="optimizer steps to check (default 4)"),
        opt("--layers", type=int, help="check a copy truncated to the model's first N layers (default: the whole "
            "model, or as many layers as one fp32 process holds)"),
        opt("--output", type=fresh.absolute, default="outputs/check-numerics", help="the check's folder: its "
            "verdict.json, the checked model, the run and its record (default outputs/check-numerics)"),
        shared.OVERWRITE, *shared.LAUNCHER), overrides=True),
    Command("audit", "which training labels are likely wrong: the run's config trained K times (K-fold "
            "cross-validation), its out-of-sample probabilities ranked by cleanlab's confident learning; writes "
            "suspects.jsonl for data.exclude_rows", "audit:main", (
        *shared.configured_run("how each fold launches: a file or a shipped name"),
        opt("--folds", type=int, default=5, help="K: each fold trains on the other K-1 folds' rows (default 5)"),
        opt("--output", type=fresh.absolute, default="outputs/audit", help="the audit's folder; a stopped audit "
            "run again with the same arguments goes on from its last fold (default outputs/audit)"),
        opt("--overwrite", action="store_true", help="start an earlier audit in --output again from its first fold"),
        *shared.LAUNCHER), overrides=True),
]


def handler(spec: str):
    """The function a table entry names ("module:function" of llmkit.commands), imported only now: a command pays
    for its own imports alone."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(f"llmkit.commands.{module}"), name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmkit` console script (argv None: the whole process; tests pass their argv)."""
    whole = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # every further argument is Accelerate's, so no parser of ours reads them
        guarded(lambda: handler(next(c.handler for c in COMMANDS if c.name == "launch"))(argv[1:]))
        return
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        each, groups = sub.add_parser(command.name, help=command.help), {}
        for flags, settings in command.options:
            group = settings.get("one_of")
            if group and group not in groups:
                groups[group] = each.add_mutually_exclusive_group()
            (groups[group] if group else each).add_argument(*flags, **{k: v for k, v in settings.items()
                                                                       if k != "one_of"})
        each.set_defaults(handler=command.handler, overrides_ok=command.overrides)
    args, rest = parser.parse_known_args(argv)
    if rest and not args.overrides_ok:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    guarded(lambda: handler(args.handler)(args), end=whole)


if __name__ == "__main__":
    main()
