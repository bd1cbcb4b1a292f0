"""`llmkit generate`: complete prompts with an exported causal LM (full, a LoRA run's merged model, or an adapter
on its base), opened through the export's owner."""

from __future__ import annotations

import argparse
import sys

import torch

from llmkit.errors import LlmkitError
from llmkit.exported import loading
from llmkit.exported.opened import open_export
from llmkit.model import generate


def main(args: argparse.Namespace) -> None:
    """`llmkit generate`, from its parsed options: each prompt's completion on its own line."""
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise LlmkitError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
    opened = open_export(args.model_dir)
    if not opened.is_causal_lm:
        raise LlmkitError(f"'{args.model_dir}' is a {', '.join(opened.architectures)}, not a causal LM: `llmkit "
                          "generate` completes text with a causal LM export; score a classifier with `llmkit eval`")
    torch.manual_seed(args.seed)
    model, tokenizer, what = loading.causal_lm(opened, args.base, args.trust_remote_code)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    print(f"# {what}", file=sys.stderr)
    for text in generate.complete(model, tokenizer, args.prompt, args.max_new_tokens, chat, args.temperature,
                                  args.top_p):
        print(text)
