"""The floor for framework overhead: a minimal hand-written Accelerate loop over the same length-grouped batches
as llmkit (same sampler, model, optimizer, scheduler and gradient clipping), nothing else. Run directly
(1 process) or under `accelerate launch` (DeepSpeed from the Accelerate config). Prints a RESULT line."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import recipe, report, tokenized_train
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, get_scheduler

from llmkit import model
from llmkit.data.loaders import LengthGroupedBatchSampler
from llmkit.train.optim import build_optimizer
from llmkit.train.run import setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    # the same process set-up as llmkit (threads per rank, gloo on CPU, the filled-in DeepSpeed config)
    cfg = recipe("--output.output_dir", tempfile.mkdtemp(prefix="llmkit-hand-"),
                 "--output.overwrite_output_dir", "true")
    t = cfg.train
    run = setup(cfg, "classification")
    acc: Accelerator = run.accelerator
    name = model.locate(cfg.model.name_or_path, "model")
    tok = AutoTokenizer.from_pretrained(name)
    train = tokenized_train(cfg, tok)
    lengths = [len(x) for x in train["input_ids"]]
    sampler = LengthGroupedBatchSampler(lengths, t.per_device_batch_size,
                                        acc.num_processes * t.gradient_accumulation_steps, seed=t.seed)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=DataCollatorWithPadding(tok))
    net = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    optimizer = build_optimizer(cfg, net)  # the same AdamW (kernel, groups) as llmkit
    net, optimizer, loader = acc.prepare(net, optimizer, loader)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, int(t.warmup_ratio * args.steps), args.steps)
    net.train()
    rows, real = 0, torch.zeros((), dtype=torch.long)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        out = net(**batch)
        acc.backward(out.loss)
        if t.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED":  # DeepSpeed clips in its step
            acc.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rows += batch["input_ids"].shape[0]
        real += batch["attention_mask"].sum()
    seconds = time.perf_counter() - start
    report({"samples_per_second": rows * acc.num_processes / seconds,
            "real_tokens_per_second": int(real) * acc.num_processes / seconds, "seconds": seconds,
            "precision": run.precision})


if __name__ == "__main__":
    main()
