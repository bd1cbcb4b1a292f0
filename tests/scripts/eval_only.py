"""Evaluate a fixed model on a split under `accelerate launch` and dump metrics + gathered rows (test helper)."""

import json
import sys

import torch

from llmkit import model
from llmkit.config import load_config
from llmkit.data import classification, loaders
from llmkit.evals.classification import score_split
from llmkit.train.optim import build_optimizer
from llmkit.train.run import setup


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[3:])
    run = setup(cfg, "classification")
    acc = run.accelerator
    tokenizer = model.load_tokenizer(cfg.model)
    with acc.main_process_first():
        ds = classification.prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    net = model.load_classifier(cfg.model, ds.label_names)
    _, eval_loaders = loaders.classification_loaders(cfg, ds, tokenizer, acc.process_index, acc.num_processes)
    # ZeRO-2 wants an optimizer to build its engine; it is never stepped here
    net, _, loader = acc.prepare(net, build_optimizer(cfg, net), eval_loaders["validation"])
    metrics, out = score_split(run, net, loader, len(ds.label_names))
    if acc.is_main_process:
        rows = {"metrics": metrics, "row": out["row"].tolist(), "pred": out["logits"].argmax(-1).tolist(),
                "labels": out["labels"].tolist(), "world_size": acc.num_processes}
        if torch.distributed.is_initialized():  # the timeout every process group got (train.collective_timeout_*)
            groups = [torch.distributed.group.WORLD] + ([run.stop.group] if run.stop.group is not None else [])
            rows["timeouts_s"] = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                                  for g in groups]
        with open(sys.argv[2], "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    main()
