"""The `llmkit` command, and the error handling shared by the recipes. Each command imports what it needs when
it runs, so `llmkit --help` and `llmkit assets` start without torch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable

from llmkit import fresh  # fresh.absolute: every folder argument, as some work on it runs in a fresh process
from llmkit.errors import USER_ERROR, LlmkitError


def is_main_rank() -> bool:
    """True on global rank 0 (or outside a launcher), so errors print once."""
    return os.environ.get("RANK", "0") == "0"


def _tell_launcher(line: str) -> None:
    """Under torch elastic (`accelerate launch` with several processes) write the error file the launcher reads
    for its failure summary: its "Root Cause" then shows this line (not "To enable traceback see ..."), in the
    plain-message form torch's ProcessFailure reads."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": line, "timestamp": int(time.time())}, fh)
    except OSError:
        pass  # the summary then says less; the line itself is already on stderr


def guarded(fn: Callable[[], object], end: bool = False) -> None:
    """Run `fn`; print an LlmkitError as one clear line (no traceback) and exit 2. `end`: this is the whole
    process (a recipe, the console command), so it ends without the interpreter's slow teardown (fresh.end)."""
    try:
        fn()
        if end:
            fresh.end(0)
    except LlmkitError as exc:
        line = f"llmkit: error: {exc}"
        if is_main_rank():
            _tell_launcher(line)
            print(line, file=sys.stderr, flush=True)
        elif "LOCAL_RANK" in os.environ:
            # most errors are raised by every rank together: rank 0 prints and exits first, and the launcher
            # stops the others during this wait (with SIGTERM, which the run's own handler must no longer catch).
            # Still alive afterwards means the error is this rank's alone: say it, unless rank 0 sent it here.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(5)
            if not exc.on_every_rank:
                _tell_launcher(line)
                print(f"llmkit: error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr, flush=True)
        _leave_process_group()
        if end:
            fresh.end(USER_ERROR)
        sys.exit(USER_ERROR)


def _leave_process_group() -> None:
    """A rank stopping on a user error leaves the process group now: in interpreter teardown, gloo's destructor
    on rank 0 (the store's host) was seen to wait ~55 s for the other ranks."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def recipe_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """`--config FILE` plus `--section.key value` overrides, as the recipes take them."""
    parser = argparse.ArgumentParser(description="llmkit recipe: --config FILE [--section.key VALUE ...]")
    parser.add_argument("--config", help="YAML recipe config")
    args, rest = parser.parse_known_args(argv)
    return args.config, rest


def _assets(_: argparse.Namespace) -> None:
    from llmkit import assets

    assets.install_all()


def _estimate_memory(args: argparse.Namespace) -> None:
    from llmkit.commands.estimate_memory import main

    main(args)


def _generate(args: argparse.Namespace) -> None:
    from llmkit.commands.generate_text import main as generate

    generate(args)


def _report(args: argparse.Namespace) -> None:
    from llmkit.report import pages

    paths = pages.build(args.run_dirs, args.output, args.overwrite)
    print(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})")


def _eval(args: argparse.Namespace) -> None:
    from llmkit.commands.eval_model import eval_export
    from llmkit.data.scored import parse_label_map
    from llmkit.metrics import scores_line

    if bool(args.zero_shot) != bool(args.prompt_template and args.label_words):
        raise LlmkitError("--zero-shot goes with --prompt-template and --label-words (and they only with it)")
    zero_shot = (args.prompt_template, args.label_words) if args.zero_shot else None
    got = eval_export(args.model_dir, args.data, args.split, args.output, args.text_column, args.text_pair_column,
                      args.label_column, args.max_length, args.batch_size, args.max_samples, args.trust_remote_code,
                      zero_shot, tuple(args.keep_columns), args.precision, parse_label_map(args.label_map),
                      args.overwrite)
    for split, m in got["splits"].items():
        print(f"{split}: {scores_line(m, got['label_names'])}")
    print(f"report: {got['report']}")


def _scored_rows(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options of `llmkit eval`, `compare` and `quantize` that say which rows are scored and how they are read."""
    parser.add_argument("--data", required=required, help="Hub id, local folder, asset:<name>, or one csv/json/jsonl "
                        "file" + ("" if required else " (default: the run's evaluation split)"))
    run = " (default: the run's data setting, else %s)"
    parser.add_argument("--text-column", help="the text column" + run % "text")
    parser.add_argument("--text-pair-column", help="the second text of a pair" + run % "none")
    parser.add_argument("--label-column", help="the label column" + run % "label")
    parser.add_argument("--max-length", type=int, help="texts are cut at this many tokens" + run % "512")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--label-map", nargs="+", metavar="DATA=MODEL", help="which model label each of the data's "
                        "labels is, e.g. 0=negative 1=positive (needed where the data's ids or names are not the "
                        "model's)")


def _precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="fp32 (the reference); "
                        "bf16 or auto (bf16 where the CPU has native bf16) score ~3x faster there")


def _overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command whole "
                        "(never a folder it did not write)")


def _zero_shot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-template", help="zero-shot: the prompt, with {text} (and {text_pair})")
    parser.add_argument("--label-words", nargs="+", help="zero-shot: one word per label, in label order (the "
                        "data's label names)")


def _model_or_asset(text: str) -> str:
    """A model folder (made absolute: another process reads it) or an asset:<name>, kept as it is."""
    return text if text.startswith("asset:") else str(fresh.absolute(text))


def _model_spec(text: str) -> str:
    """A model to compare: a folder, or zero-shot:<folder or asset:name>."""
    if text.startswith("zero-shot:"):
        return "zero-shot:" + _model_or_asset(text.removeprefix("zero-shot:"))
    return _model_or_asset(text)


def _compare(args: argparse.Namespace) -> None:
    from llmkit.commands.compare import main as compare

    compare(args)


def _push(args: argparse.Namespace) -> None:
    from llmkit.ship import hub

    hub.push(args.run_dir, args.repo_id, private=not args.public, revision=args.revision,
             push_merged=args.merged, dry_run=args.dry_run, staging=args.output, overwrite=args.overwrite)


def _validate(args: argparse.Namespace) -> None:
    from llmkit.commands.validate import validate

    validate(args.config, args.overrides, args.accelerate_config, args.recipe)


def _explain(args: argparse.Namespace) -> None:
    from llmkit.commands.explain_texts import main as explain

    explain(args)


def _quantize(args: argparse.Namespace) -> None:
    from llmkit.commands.quantize_export import main as quantize

    quantize(args)


def _config(args: argparse.Namespace) -> None:
    from llmkit.config import docs

    if args.write:
        docs.write(args.write, args.recipe)
    else:
        print(docs.listing(), end="")


def _train(args: argparse.Namespace) -> None:
    from llmkit.commands.launcher import train

    train(args)


def _recipes(_: argparse.Namespace) -> None:
    from llmkit.commands.launcher import listing

    print(listing(), end="")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmkit` console script (argv None: the whole process; tests pass their argv)."""
    whole = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # every further argument is Accelerate's
        from llmkit.commands.launcher import launch

        guarded(lambda: launch(argv[1:]))
        return
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="accelerate launch with the same arguments; a user error exits 2 with its one "
                   "line, without the launcher's traceback")
    sub.add_parser("assets", help="install the offline model and data assets (idempotent)").set_defaults(fn=_assets)
    est = sub.add_parser("estimate-memory", help="per-device memory of a run at these settings: the estimate its "
                         "preflight makes and checks (ZeRO formulas, DeepSpeed's peak, activations)")
    est.add_argument("--model", required=True, help="Hub id, local dir or asset:<name> (only its config is read)")
    est.add_argument("--zero-stage", type=int, required=True, choices=[0, 1, 2, 3])
    est.add_argument("--num-gpus", type=int, default=1, help="data-parallel devices in all")
    est.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="what the ranks run on: the activations' "
                     "kernels, and on a CPU the runtime and offloaded states count in the same memory")
    est.add_argument("--no-deepspeed", action="store_true", help="plain data parallel (torch DDP), with --zero-stage 0")
    est.add_argument("--deepspeed-config", help="the run's DeepSpeed JSON (default: ds_configs/zero<stage>.json)")
    est.add_argument("--no-zero3-init", action="store_true", help="ZeRO-3 loads whole on every rank "
                     "(zero3_init_flag false): the host-at-load line")
    est.add_argument("--offload", choices=["none", "optimizer", "params", "both"], default="none")
    est.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    est.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    est.add_argument("--trust-remote-code", action="store_true")
    est.add_argument("--lora-r", type=int, default=0, help="LoRA adapters of this rank on every projection (peft's "
                     "defaults for the architecture): only they, and a classifier's head, are trained")
    est.add_argument("--qlora", action="store_true", help="with --lora-r: the frozen base in 4-bit NF4")
    est.add_argument("--batch-size", type=int, default=0, help="with --seq-len: rows per micro-batch on each device, "
                     "to add the activations, a causal LM's loss over the vocabulary and its evaluation batch")
    est.add_argument("--seq-len", type=int, default=0, help="with --batch-size: tokens per row (data.max_length)")
    est.add_argument("--eval-batch-size", type=int, default=0, help="rows per evaluation batch (train.eval_batch_size; "
                     "default: its config default): a causal LM scores them over the vocabulary")
    est.add_argument("--padded", action="store_true", help="causal-lm: prompt/response rows padded with a mask "
                     "(default: text packed into blocks)")
    est.add_argument("--gradient-checkpointing", action="store_true", help="activations as under "
                     "model.gradient_checkpointing: each layer's input and one layer recomputed")
    est.set_defaults(fn=_estimate_memory)
    gen = sub.add_parser("generate", help="complete prompts with an exported causal LM (full, merged or adapter)")
    gen.add_argument("model_dir", type=fresh.absolute,
                     help="a run's final/ folder, a merged or full model folder, or a LoRA adapter")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                     help="wrap the prompt in the chat template (auto: when the tokenizer has one)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--base", help="base model of an adapter (default: from adapter_config.json)")
    gen.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code")
    gen.set_defaults(fn=_generate)
    rep = sub.add_parser("report", help="evaluation report (html, md, json) of one or more runs (classifiers or "
                         "language models)")
    rep.add_argument("run_dirs", nargs="+", type=fresh.absolute,
                     help="run output directories (or `llmkit eval` outputs)")
    rep.add_argument("--output", type=fresh.absolute,
                     help="where the report goes (default: the run directory; required for several)")
    _overwrite(rep)
    rep.set_defaults(fn=_report)
    cmp = sub.add_parser("compare", help="score exported classifiers (and llmkit label-word LMs) on the same rows; per "
                         "pair the differences with "
                         "bootstrap confidence intervals and McNemar's exact test")
    cmp.add_argument("models", nargs="+", type=_model_spec, help="two or more classifier folders (e.g. <run>/final), "
                     "or zero-shot:<causal LM folder or asset:name>")
    cmp.add_argument("--output", type=fresh.absolute, required=True, help="the comparison's folder")
    _overwrite(cmp)
    _scored_rows(cmp)
    _precision(cmp)
    cmp.add_argument("--split", default="test", help="the rows every model scores")
    cmp.add_argument("--calibration-split", help="the split each model's temperature is fitted on (default: "
                     "validation where the data has it; none: no temperature)")
    cmp.add_argument("--slice-by", nargs="+", help="data columns whose values cut the rows into more slices")
    cmp.add_argument("--explain-rows", type=int, default=2, help="per pair, the most confident disagreements "
                     "explained word by word (0: none)")
    cmp.add_argument("--resamples", type=int, default=2000, help="paired-bootstrap resamples")
    cmp.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    _zero_shot_args(cmp)
    cmp.set_defaults(fn=_compare)
    ev = sub.add_parser("eval", help="evaluate an exported sequence classifier (or an llmkit label-word causal LM) "
                        "on a labelled split, with a report")
    ev.add_argument("model_dir", type=_model_or_asset,
                    help="a classifier folder, e.g. <run>/final (any transformers classifier)")
    ev.add_argument("--output", type=fresh.absolute, help="output folder (default: <model_dir>/eval-<split>)")
    _overwrite(ev)
    _scored_rows(ev)
    _precision(ev)
    ev.add_argument("--split", nargs="+", default=["test"], help="the split(s) to score, each its own predictions file")
    ev.add_argument("--keep-columns", nargs="+", default=[], help="more columns of the first --split copied into "
                    "its prediction rows")
    ev.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code")
    ev.add_argument("--zero-shot", action="store_true", help="model_dir is any causal LM (a folder or asset:<name>) "
                    "scoring --label-words after --prompt-template, untrained for the task")
    _zero_shot_args(ev)
    ev.set_defaults(fn=_eval)
    push = sub.add_parser("push", help="push a run's export, report and model card to the Hugging Face Hub")
    push.add_argument("run_dir", type=fresh.absolute, help="a run output directory (with final/) or its final/ folder")
    push.add_argument("repo_id", help="<user or org>/<name>")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", action="store_true", help="a private repo (the default)")
    visibility.add_argument("--public", action="store_true", help="a public repo")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.add_argument("--merged", action="store_true", help="LoRA runs: also push the merged model (merged/)")
    push.add_argument("--dry-run", action="store_true",
                      help="write exactly the folder that would be uploaded, list it, touch no network")
    push.add_argument("--output", type=fresh.absolute,
                      help="--dry-run: where the folder goes (default <run_dir>/hub_upload)")
    _overwrite(push)
    push.set_defaults(fn=_push)
    val = sub.add_parser("validate", help="run every check of a recipe that needs no training, then stop")
    val.add_argument("config", help="the recipe YAML")
    val.add_argument("--accelerate-config", help="the Accelerate yaml you will launch with (processes, DeepSpeed)")
    val.add_argument("--recipe", choices=["classification", "causal_lm"],
                     help="the recipe you will run (default: causal_lm for a causal LM or prompt/chat data)")
    val.set_defaults(fn=_validate)  # any further --section.key value arguments override the config
    exp = sub.add_parser("explain", help="each word's attribution toward every label of an exported classifier "
                         "or label-word causal LM (integrated gradients)")
    exp.add_argument("model_dir", type=fresh.absolute,
                     help="a run's final/ folder (or any saved sequence classifier or causal LM)")
    exp.add_argument("--text", action="append", help="a text to explain (repeatable)")
    exp.add_argument("--file", help="a file of texts, one per line")
    exp.add_argument("--text-pair", help="the second text of a text-pair classifier, the same for every text")
    exp.add_argument("--prompt-template", help="a causal LM's prompt with {text} (default: the run's "
                     "data.prompt_template, from training_config.yaml beside the model)")
    exp.add_argument("--label-words", nargs="+", help="a causal LM's label words, in label order (default: the run's)")
    exp.add_argument("--max-length", type=int, help="the longest prompt in tokens (default: the run's data.max_length)")
    exp.add_argument("--steps", type=int, default=16, help="integration steps to start at (more: smaller delta, "
                     "slower); a text whose delta is over 5%% of what it explains is redone with twice as many")
    exp.add_argument("--max-steps", type=int, default=256, help="the most steps a text is raised to; a text still "
                     "over 5%% there is flagged (--max-steps equal to --steps: never raised)")
    exp.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code")
    exp.set_defaults(fn=_explain)
    qnt = sub.add_parser("quantize", help="quantized copies of an export beside it (e.g. final-onnx-int8/), each "
                         "scored against the full model (a GGUF by transformers' GGUF reader, not llama.cpp)")
    qnt.add_argument("model_dir", type=fresh.absolute, help="an exported model folder, e.g. <run>/final")
    qnt.add_argument("--to", nargs="+", required=True, help="onnx-int8 (classifiers), gguf-f16, gguf-q8_0 (Llama LMs), "
                     "torchao-int8 (causal LMs)")
    _scored_rows(qnt, required=False)
    qnt.add_argument("--split", default="test", help="with --data: the split the copies are scored on")
    qnt.set_defaults(fn=_quantize)
    conf = sub.add_parser("config", help="every config key with its type, default and meaning; or write a starter "
                          "YAML (--write)")
    conf.add_argument("--write", metavar="FILE", help="write a commented starter YAML of every key the recipe reads")
    conf.add_argument("--recipe", choices=["classification", "causal_lm"], default="classification",
                      help="the recipe the starter is for (default: classification)")
    conf.set_defaults(fn=_config)
    run = sub.add_parser("train", help="run a recipe under accelerate launch from any folder, each file a path or a "
                         "name llmkit ships; any further --section.key value overrides the config")
    run.add_argument("recipe", help="classification, causal_lm, or a recipe script")
    run.add_argument("--config", help="the recipe config: a YAML file or a shipped config's name")
    run.add_argument("--accelerate-config", help="a file or a shipped name, e.g. cpu_zero2 (default: Accelerate's own)")
    run.add_argument("--num-processes", type=int, help="processes in all (default: the Accelerate config's)")
    run.add_argument("--main-process-port", type=int, help="rank 0's port (default: the Accelerate config's)")
    run.set_defaults(fn=_train)
    sub.add_parser("recipes", help="the recipes, recipe configs, Accelerate and DeepSpeed configs llmkit ships, by "
                   "name").set_defaults(fn=_recipes)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("validate", "train"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    guarded(lambda: args.fn(args), end=whole)


if __name__ == "__main__":
    main()
