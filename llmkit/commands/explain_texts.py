"""`llmkit explain`: each word's attribution toward every label of an exported classifier or label-word causal
LM, printed for the texts given (llmkit.evals.explain does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.evals import attribution, explain


def main(args: argparse.Namespace) -> None:
    """`llmkit explain`, from its parsed options."""
    texts = list(args.text or [])
    if args.file:
        texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise LlmkitError("give the texts to explain: --text \"...\" (repeatable) or --file FILE (one per line)")
    if args.steps < 1 or args.max_steps < 1:
        raise LlmkitError(f"--steps and --max-steps must be >= 1; got {args.steps}, {args.max_steps}")
    subject = explain.load(args.model_dir, args.trust_remote_code, prompt_template=args.prompt_template,
                           label_words=args.label_words, max_length=args.max_length)
    pairs = [args.text_pair] * len(texts) if args.text_pair is not None else None
    rows = explain.explain(subject, texts, pairs, steps=args.steps, max_steps=args.max_steps)
    for row in rows:
        names = list(row["attributions"])
        probs = ", ".join(f"{n} {p:.3f}" for n, p in zip(names, row["probabilities"]))
        pair = f"\n  (pair) {row['text_pair']}" if "text_pair" in row else ""
        print(f"\n{row['text']}{pair}\n  predicted: {row['prediction']} ({probs})")
        if row["steps"] > args.steps:
            print(f"  integration steps: {row['steps']} (raised from {args.steps}: the delta was over "
                  f"{attribution.CONVERGED:.0%} of what it explains)")
        if not row["converged"]:
            print(f"  the delta is still over {attribution.CONVERGED:.0%} of what it explains at {row['steps']} "
                  f"steps: rerun with more --max-steps than {args.max_steps}")
        for name in names:
            words = "  ".join(f"{w} {a:+.3f}" for w, a in zip(row["words"], row["attributions"][name]))
            print(f"  toward {name} (delta {row['delta'][name]:.1e}): {words}")
    print(f"\nintegrated gradients at {explain.steps_note(rows, args.steps, args.max_steps)}")
