"""What llmkit.cli's parser table is written with: `opt` (one argument), the options several commands share
(written once here, so their help and defaults cannot drift apart) and the argument types that read a model given
on the command line. Light on purpose: the parser imports it before it knows which command runs."""

from __future__ import annotations

from llmkit import fresh


def opt(*flags: str, **settings) -> tuple:
    """One option or positional argument, as argparse's add_argument takes it (one_of="name": in that mutually
    exclusive group)."""
    return flags, settings


def model_or_asset(text: str) -> str:
    """A model folder (made absolute: another process reads it) or an asset:<name>, kept as it is."""
    return text if text.startswith("asset:") else str(fresh.absolute(text))


def model_spec(text: str) -> str:
    """A model to compare: a folder, or zero-shot:<folder or asset:name>."""
    if text.startswith("zero-shot:"):
        return "zero-shot:" + model_or_asset(text.removeprefix("zero-shot:"))
    return model_or_asset(text)


def scored_rows(required: bool = True) -> tuple:
    """The options of `llmkit eval`, `compare` and `quantize` that say which rows are scored and how they are read."""
    run = " (default: the run's data setting, else %s)"
    return (opt("--data", required=required, help="Hub id, local folder, asset:<name>, or one csv/json/jsonl file"
                + ("" if required else " (default: the run's evaluation split)")),
            opt("--text-column", help="the text column" + run % "text"),
            opt("--text-pair-column", help="the second text of a pair" + run % "none"),
            opt("--label-column", help="the label column" + run % "label"),
            opt("--max-length", type=int, help="texts are cut at this many tokens" + run % "512"),
            opt("--batch-size", type=int, default=64), opt("--max-samples", type=int),
            opt("--label-map", nargs="+", metavar="DATA=MODEL", help="which model label each of the data's labels "
                "is, e.g. 0=negative 1=positive (needed where the data's ids or names are not the model's)"))


PRECISION = opt("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="fp32 (the reference); bf16 "
                "or auto (bf16 where the CPU has native bf16) score ~3x faster there")
OVERWRITE = opt("--overwrite", action="store_true", help="replace an earlier output of this command whole (never a "
                "folder it did not write)")
ZERO_SHOT = (opt("--prompt-template", help="zero-shot: the prompt, with {text} (and {text_pair})"),
             opt("--label-words", nargs="+", help="zero-shot: one word per label, in label order (the data's label "
                 "names)"))
TRUST = opt("--trust-remote-code", action="store_true", help="run the model folder's own Python code")
RECIPES = ["classification", "causal_lm"]  # the recipes `validate` and `config` know by name
LAUNCHER = (opt("--num-processes", type=int, help="processes in all (default: the Accelerate config's)"),
            opt("--main-process-port", type=int, help="rank 0's port (default: the Accelerate config's)"))
