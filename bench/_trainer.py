"""HF Trainer on the sentiment recipe: `best` (dynamic padding + group_by_length) or `glue` (transformers'
run_glue.py defaults: every row padded to 128, random batches), one epoch over the first `--rows` rows llmkit
trains on (the same subset). One process, or under `accelerate launch` with `--deepspeed CONFIG`. Prints a
RESULT line (rank 0)."""

from __future__ import annotations

import argparse
import math
import os

import torch
from _common import classifier, recipe, report, tokenized_train
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from llmkit import model
from llmkit.launch.precision import resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["best", "glue"], required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", help="a DeepSpeed JSON (under accelerate launch)")
    args = ap.parse_args()
    cfg = recipe("--data.max_train_samples", str(args.rows))
    t = cfg.train
    precision, _ = resolve_precision(t.precision)
    name = model.locate(cfg.model.name_or_path, "model")
    tok = AutoTokenizer.from_pretrained(name)
    train = tokenized_train(cfg, tok, pad_to=128 if args.mode == "glue" else None).rename_column("labels", "label")
    net = classifier(cfg, name)
    seen = {"rows": 0}
    base = DataCollatorWithPadding(tok)

    def collate(rows):
        seen["rows"] += len(rows)
        return base(rows)

    steps = math.ceil(args.rows / (t.per_device_batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=1, per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * steps),
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm, seed=t.seed, bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(), report_to=[], optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length" if args.mode == "best" else "random",
        save_strategy="no", eval_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
        disable_tqdm=True, deepspeed=args.deepspeed)
    trainer = Trainer(model=net, args=targs, train_dataset=train, data_collator=collate)
    metrics = trainer.train().metrics
    report({"seconds": metrics["train_runtime"], "rows": seen["rows"] * trainer.args.world_size,
            "precision": precision})


if __name__ == "__main__":
    main()
