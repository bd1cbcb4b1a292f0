"""The floor for framework overhead: a minimal hand-written Accelerate loop over the same length-grouped batches
as llmkit (same sampler, model, optimizer, scheduler and gradient clipping), nothing else. Run directly
(1 process) or under `accelerate launch` (DeepSpeed from the Accelerate config), one epoch over the first
`--rows` rows llmkit trains on. Prints a RESULT line."""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import classifier, recipe, report, tokenized_train
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, get_scheduler

from llmkit import model
from llmkit.data.loaders import LengthGroupedBatchSampler
from llmkit.train.optim import build_optimizer
from llmkit.train.run import setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, required=True)
    args = ap.parse_args()
    # the same process set-up as llmkit (threads per rank, gloo on CPU, the filled-in DeepSpeed config)
    cfg = recipe("--output.output_dir", tempfile.mkdtemp(prefix="llmkit-hand-"),
                 "--output.overwrite_output_dir", "true", "--data.max_train_samples", str(args.rows))
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
    net = classifier(cfg, name)
    optimizer = build_optimizer(cfg, net)  # the same AdamW (kernel, groups) as llmkit
    net, optimizer, loader = acc.prepare(net, optimizer, loader)
    steps = len(loader)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, int(t.warmup_ratio * steps), steps)
    net.train()
    rows = 0
    start = time.perf_counter()
    for batch in loader:  # one epoch
        out = net(**batch)
        acc.backward(out.loss)
        if t.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED":  # DeepSpeed clips in its step
            acc.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rows += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    report({"seconds": seconds, "rows": rows * acc.num_processes, "precision": run.precision})


if __name__ == "__main__":
    main()
