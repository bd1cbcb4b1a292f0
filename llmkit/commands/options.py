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
def configured_run(accelerate_help: str) -> tuple:
    """The options of the commands that run a recipe config as it would train (check-numerics, audit)."""
    return (opt("recipe", choices=RECIPES),
            opt("--config", required=True, help="the recipe config: a YAML file or a shipped config's name"),
            opt("--accelerate-config", required=True, help=accelerate_help))


LAUNCHER = (opt("--num-processes", type=int, help="processes in all (default: the Accelerate config's)"),
            opt("--main-process-port", type=int, help="rank 0's port (default: the Accelerate config's)"))
# `llmkit estimate-memory`: the settings a run's memory depends on
ESTIMATE_MEMORY = (
        opt("--model", required=True, help="Hub id, local dir or asset:<name> (only its config is read)"),
        opt("--zero-stage", type=int, required=True, choices=[0, 1, 2, 3]),
        opt("--num-gpus", type=int, default=1, help="data-parallel devices in all"),
        opt("--device", choices=["gpu", "cpu"], default="gpu", help="what the ranks run on: the activations' kernels, "
            "and on a CPU the runtime and offloaded states count in the same memory"),
        opt("--no-deepspeed", action="store_true", help="plain data parallel (torch DDP), with --zero-stage 0"),
        opt("--deepspeed-config", help="the run's DeepSpeed JSON (default: ds_configs/zero<stage>.json)"),
        opt("--no-zero3-init", action="store_true", help="ZeRO-3 loads whole on every rank (zero3_init_flag false): "
            "the host-at-load line"),
        opt("--offload", choices=["none", "optimizer", "params", "both"], default="none"),
        opt("--precision", choices=["bf16", "fp16", "fp32"], default="bf16"),
        opt("--task", choices=["classification", "causal-lm"], default="classification"),
        opt("--trust-remote-code", action="store_true"),
        opt("--lora-r", type=int, default=0, help="LoRA adapters of this rank on every projection (peft's defaults "
            "for the architecture): only they, and a classifier's head, are trained"),
        opt("--qlora", action="store_true", help="with --lora-r: the frozen base in 4-bit NF4"),
        opt("--batch-size", type=int, default=0, help="with --seq-len: rows per micro-batch on each device, to add "
            "the activations, a causal LM's loss over the vocabulary and its evaluation batch"),
        opt("--seq-len", type=int, default=0, help="with --batch-size: tokens per row (data.max_length)"),
        opt("--eval-batch-size", type=int, default=0, help="rows per evaluation batch (train.eval_batch_size; "
            "default: its config default): a causal LM scores them over the vocabulary"),
        opt("--padded", action="store_true", help="causal-lm: prompt/response rows padded with a mask (default: text "
            "packed into blocks)"),
        opt("--loss-chunk", type=int, help="causal-lm: scored positions per chunk of the loss (train.loss_chunk, "
            "default 1024; 0: the full logits)"),
        opt("--gradient-checkpointing", action="store_true", help="activations as under model.gradient_checkpointing: "
            "each layer's input and one layer recomputed"))
