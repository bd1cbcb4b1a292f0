"""HF Trainer on the sentiment recipe: `best` (dynamic padding + group_by_length) or `glue` (transformers'
run_glue.py defaults: every row padded to 128, random batches). One process. Prints a RESULT line."""

from __future__ import annotations

import argparse

import torch
from _common import recipe, report, tokenized_train
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from llmkit import model
from llmkit.precision import resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["best", "glue"], required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = recipe()
    t = cfg.train
    precision, _ = resolve_precision(t.precision)
    name = model.locate(cfg.model.name_or_path, "model")
    tok = AutoTokenizer.from_pretrained(name)
    train = tokenized_train(cfg, tok, pad_to=128 if args.mode == "glue" else None).rename_column("labels", "label")
    net = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    real = {"tokens": 0}
    base = DataCollatorWithPadding(tok)

    def collate(rows):
        batch = base(rows)
        real["tokens"] += int(batch["attention_mask"].sum())
        return batch

    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * args.steps),
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm, seed=t.seed, bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(), report_to=[], optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length" if args.mode == "best" else "random",
        save_strategy="no", eval_strategy="no", logging_steps=args.steps, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=net, args=targs, train_dataset=train, data_collator=collate)
    metrics = trainer.train().metrics
    seconds = metrics["train_runtime"]
    report({"samples_per_second": args.steps * t.per_device_batch_size / seconds,
            "real_tokens_per_second": real["tokens"] / seconds, "seconds": seconds, "precision": precision})


if __name__ == "__main__":
    main()
