"""Fine-tune a causal LM (full or LoRA) on packed text or prompt/response / chat rows: setup / train / export.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/causal_lm.py \
        --config recipes/configs/<name>.yaml [--lora.enabled true ...]
"""

import torch
from torch.utils.data import DataLoader

from llmkit import engine, export, lm_data, model
from llmkit.cli import guarded, recipe_args
from llmkit.config import load_config


def main() -> None:
    # setup: the config is checked before any process group starts
    cfg = load_config(*recipe_args())
    run = engine.setup(cfg, hidden=model.hidden_size(cfg.model))
    acc = run.accelerator
    tokenizer = model.load_tokenizer(cfg.model)
    with acc.main_process_first():
        ds = lm_data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log)
    run.log(f"data: {ds.mode}, train {len(ds.train)}, validation {len(ds.eval)} examples")
    net = model.load_causal_lm(cfg.model, cfg.lora)
    optimizer = engine.build_optimizer(cfg, net)
    collate = lm_data.LMCollator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(ds.train, batch_size=cfg.train.per_device_batch_size, shuffle=True, generator=gen,
                              collate_fn=collate)
    eval_loader = DataLoader(ds.eval, batch_size=cfg.train.eval_batch_size, collate_fn=collate)

    # train
    result = engine.train(run, net, optimizer, train_loader, eval_loader,
                          lambda m, loader: engine.evaluate_lm(run, m, loader))
    net = result["model"]

    # evaluate, then export (adapter + merged for LoRA), verified by reloading with plain transformers / peft
    validation = engine.evaluate_lm(run, net, acc.prepare_data_loader(eval_loader))
    results = {"train": result["summary"], "validation": validation}
    if ds.packing is not None:
        results["packing_efficiency"] = ds.packing.efficiency
    probe = [ds.eval[i]["input_ids"][:16] for i in range(min(2, len(ds.eval)))]
    width = min(len(p) for p in probe)
    probe = [p[:width] for p in probe]
    net.eval()
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward is collective
        logits = net(input_ids=torch.tensor(probe, device=acc.device)).logits.float().cpu().tolist()
    final = export.save_causal_lm(run, net, tokenizer, results, model.locate(cfg.model.name_or_path, "model"),
                                  probe, logits)
    m = results["validation"]
    run.log(f"validation: loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  ({m['tokens']} tokens)")
    run.log(f"export: {final}  (train {result['summary']['train_seconds']} s)")
    acc.end_training()


if __name__ == "__main__":
    guarded(main)
