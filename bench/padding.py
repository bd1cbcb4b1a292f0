"""Padding efficiency (real, non-pad tokens / processed tokens) of llmkit's training batches, over one full
epoch, no model needed:

  classifier   sentiment_minilm_polarity.yaml: the polarity train split from llmkit.data.classification.prepare,
               batched by llmkit.data.loaders.train_loader (LengthGroupedBatchSampler, or shuffled rows with
               group_by_length off)
               with DataCollatorWithPadding, 16 rows per rank, dealt to 1 or 2 ranks by Accelerate's
               prepare_data_loader exactly as in a run; and rows padded to 128 (run_glue.py's default)
  lm_packed    smollm2_full_polarity_text.yaml: PackStats.efficiency of llmkit.data.lm.pack (train split)
  lm_labels    sentiment_smollm2_lora.yaml: prompt -> label-word rows batched by llmkit.data.loaders.lm_loaders
               (LMCollator, 8 rows per rank), grouped vs shuffled; and its eval loader (CandidateCollator)

"per rank" is what a run's metrics.json reports (train.padding_efficiency). "lockstep" counts what the ranks
of one step wait for: every rank as wide as the step's largest batch. Targets: >= 0.95 with length grouping,
>= 0.99 for packing. Writes bench/results/padding.json.

    .venv/bin/python bench/padding.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
GROUPED, PACKED = 0.95, 0.99


def epoch(make_loader, cfg, ranks: int) -> list[list]:
    """One epoch of attention masks, step by step: [[rank 0's mask, rank 1's mask, ...], ...]."""
    from accelerate.data_loader import prepare_data_loader

    loaders = []
    for rank in range(ranks):
        loaders.append(prepare_data_loader(make_loader(rank, ranks), num_processes=ranks, process_index=rank,
                                           put_on_device=False))
    return [[b["attention_mask"] for b in step] for step in zip(*loaders)]


def efficiency(steps: list[list]) -> dict:
    real = sum(int(m.sum()) for step in steps for m in step)
    per_rank = sum(m.numel() for step in steps for m in step)
    lockstep = sum(len(step) * max(m.numel() for m in step) for step in steps)
    return {"per_rank": real / per_rank, "lockstep": real / lockstep, "steps": len(steps)}


def batches(cfg, make_loader) -> dict:
    """Grouped and shuffled, on 1 and 2 ranks (group_by_length is read by loaders.train_loader)."""
    out = {}
    for group in (True, False):
        grouped = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, group_by_length=group))
        for ranks in (1, 2):
            out[f"{'grouped' if group else 'shuffled'}, {ranks} rank{'s' if ranks > 1 else ''}"] = \
                efficiency(epoch(make_loader, grouped, ranks))
    return out


def main() -> None:
    from transformers import DataCollatorWithPadding

    from llmkit import model
    from llmkit.config import load_config
    from llmkit.data import classification, lm, loaders

    quiet = {"log": lambda m: None}
    results: dict[str, dict] = {}

    cfg = load_config(CONFIGS / "sentiment_minilm_polarity.yaml")
    tok = model.load_tokenizer(cfg.model)
    ds = classification.prepare(cfg.data, tok, seed=cfg.train.seed, **quiet)
    collate = DataCollatorWithPadding(tok)
    results["classifier"] = batches(cfg, lambda rank, world: loaders.train_loader(cfg, ds.train, ds.train_lengths,
                                                                                        collate, rank, world))
    real = sum(ds.train_lengths)
    results["classifier"]["pad to 128 (run_glue)"] = {"per_rank": real / (128 * len(ds.train_lengths))}

    cfg = load_config(CONFIGS / "smollm2_full_polarity_text.yaml")
    tok = model.load_tokenizer(cfg.model)
    packed = lm.prepare(cfg.data, tok, seed=cfg.train.seed, **quiet)
    results["lm_packed"] = {f"packed in {packed.packing.block_size}-token blocks":
                            {"per_rank": packed.packing.efficiency}}

    cfg = load_config(CONFIGS / "sentiment_smollm2_lora.yaml")
    tok = model.load_tokenizer(cfg.model)
    words = lm.prepare(cfg.data, tok, seed=cfg.train.seed, **quiet)
    results["lm_labels"] = batches(cfg, lambda rank, world: loaders.lm_loaders(cfg, words, tok, rank, world)[0])
    # eval: every row's label-word candidates, in the order they are scored
    evals = [[b["attention_mask"]] for b in loaders.lm_loaders(cfg, words, tok, 0, 1)[1]["validation"]]
    results["lm_labels"]["eval candidates, 1 rank"] = efficiency(evals)

    print(f"\n{'path':<11}{'batches':<32}{'per rank':>9}{'lockstep':>10}{'target':>8}  meets")
    for path, figures in results.items():
        for name, f in figures.items():
            target = PACKED if path == "lm_packed" else GROUPED if name.startswith("grouped") else None
            f["target"] = target
            f["meets"] = None if target is None else f["per_rank"] >= target
            lock = f"{f['lockstep']:.4f}" if "lockstep" in f else "-"
            meets = "-" if target is None else "yes" if f["meets"] else "NO"
            print(f"{path:<11}{name:<32}{f['per_rank']:>9.4f}{lock:>10}{target or '-':>8}  {meets}")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "padding.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
