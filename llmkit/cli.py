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


def _estimate_memory(args: argparse.Namespace) -> None:
    from llmkit import memory

    params = memory.count_parameters(args.model, args.task, args.trust_remote_code)
    offload = {"none": (False, False), "optimizer": (True, False), "params": (False, True), "both": (True, True)}
    opt, par = offload[args.offload]
    print(memory.estimate(params, args.zero_stage, args.num_gpus, args.precision, opt, par).table())


def _generate(args: argparse.Namespace) -> None:
    import torch

    from llmkit import generate

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise LlmkitError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
    torch.manual_seed(args.seed)
    model, tokenizer, what = generate.load(args.model_dir, args.base)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    print(f"# {what}", file=sys.stderr)
    for text in generate.complete(model, tokenizer, args.prompt, args.max_new_tokens, chat, args.temperature,
                                  args.top_p):
        print(text)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmkit` console script."""
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("assets", help="install the offline model and data assets (idempotent)").set_defaults(fn=_assets)
    est = sub.add_parser("estimate-memory", help="per-device bytes of params, grads and Adam states under ZeRO")
    est.add_argument("--model", required=True, help="Hub id, local dir or asset:<name> (only its config is read)")
    est.add_argument("--zero-stage", type=int, required=True, choices=[0, 1, 2, 3])
    est.add_argument("--num-gpus", type=int, default=1, help="data-parallel devices in all")
    est.add_argument("--offload", choices=["none", "optimizer", "params", "both"], default="none")
    est.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    est.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    est.add_argument("--trust-remote-code", action="store_true")
    est.set_defaults(fn=_estimate_memory)
    gen = sub.add_parser("generate", help="complete prompts with an exported causal LM (full, merged or adapter)")
    gen.add_argument("model_dir", help="a run's final/ folder, a merged or full model folder, or a LoRA adapter")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                     help="wrap the prompt in the chat template (auto: when the tokenizer has one)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--base", help="base model of an adapter (default: from adapter_config.json)")
    gen.set_defaults(fn=_generate)
    args = parser.parse_args(argv)
    guarded(lambda: args.fn(args))


if __name__ == "__main__":
    main()
