"""Evaluate a fixed model on a split under `accelerate launch` and dump metrics + gathered rows (test helper)."""

import json
import sys

from llmkit import data, engine, model
from llmkit.config import load_config


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[3:])
    run = engine.setup(cfg, hidden=model.hidden_size(cfg.model))
    tokenizer = model.load_tokenizer(cfg.model)
    with run.accelerator.main_process_first():
        ds = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    net = model.load_classifier(cfg.model, ds.label_names)
    _, loaders = engine.dataloaders(run, ds, tokenizer)
    # ZeRO-2 wants an optimizer to build its engine; it is never stepped here
    net, _, loader = run.accelerator.prepare(net, engine.build_optimizer(cfg, net), loaders["validation"])
    metrics, out = engine.evaluate(run, net, loader, len(ds.label_names))
    if run.accelerator.is_main_process:
        rows = {"metrics": metrics, "row": out["row"].tolist(), "pred": out["logits"].argmax(-1).tolist(),
                "labels": out["labels"].tolist(), "world_size": run.accelerator.num_processes}
        with open(sys.argv[2], "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    main()
