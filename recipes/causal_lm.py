"""Fine-tune a causal LM (full or LoRA) on packed text, prompt/response or chat rows, or label words (generative
classification): setup / train / evaluate / export.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/causal_lm.py \
        --config recipes/configs/sentiment_smollm2_lora.yaml [--lora.r 8 ...]
"""

import torch

from llmkit import engine, export, hub, lm_data, lm_eval, model, report
from llmkit.cli import guarded, recipe_args
from llmkit.config import load_config


def main() -> None:
    # setup: the config is checked before any process group starts
    cfg = load_config(*recipe_args())
    run = engine.setup(cfg, hidden=model.hidden_size(cfg.model))
    acc = run.accelerator
    if model.needs_trained_tokenizer(cfg.model):
        cfg.model.tokenizer = lm_data.train_tokenizer_once(run, cfg)
    tokenizer = model.load_tokenizer(cfg.model)
    with acc.main_process_first():
        ds = lm_data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log)
    run.log(f"data: {ds.mode}, train {len(ds.train)}, validation {len(ds.eval)} examples"
            + (f"; label words {ds.label_words}" if ds.label_words else ""))
    net = model.load_causal_lm(cfg.model, cfg.lora, tokenizer)
    optimizer = engine.build_optimizer(cfg, net)
    train_loader, eval_loaders = lm_data.dataloaders(run, ds, tokenizer)

    last = {}  # the latest validation scores, reused when training ended with an eval (it always does)

    def evaluate(m, loader, step):
        lm_eval.log_samples(run, m, tokenizer, step)
        if ds.mode == "labels":
            metrics, last["out"] = lm_eval.score_labels(run, m, loader, len(ds.label_names))
        else:
            metrics = lm_eval.evaluate_lm(run, m, loader)
        last.update(step=step, metrics=metrics)
        return metrics

    # train
    result = engine.train(run, net, optimizer, train_loader, eval_loaders["validation"], evaluate)
    net = result["model"]

    # evaluate the final model (generative classification: every split, with prediction files)
    results = {"train": result["summary"], **({"label_names": ds.label_names} if ds.label_names else {})}
    for name, loader in eval_loaders.items():
        loader = acc.prepare_data_loader(loader)
        if name == "validation" and last.get("step") == result["summary"]["steps"]:
            results[name], out = last["metrics"], last.get("out")
        elif ds.mode == "labels":
            results[name], out = lm_eval.score_labels(run, net, loader, len(ds.label_names))
        else:
            results[name], out = lm_eval.evaluate_lm(run, net, loader), None
        if out is not None and acc.is_main_process:
            export.write_predictions(run.output_dir / f"predictions_{name}.jsonl", ds.raw[name], out,
                                     ds.label_names, cfg.data.text_column)
    if ds.packing is not None:
        results["packing_efficiency"] = ds.packing.efficiency

    # export (adapter + merged for LoRA), verified by reloading with plain transformers / peft
    probe = [ds.train[i]["input_ids"][:16] for i in range(min(2, len(ds.train)))]
    width = min(len(p) for p in probe)
    probe = [p[:width] for p in probe]
    net.eval()
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward is collective
        logits = net(input_ids=torch.tensor(probe, device=acc.device)).logits.float().cpu().tolist()
    final = export.save_causal_lm(run, net, tokenizer, results, model.locate(cfg.model.name_or_path, "model"),
                                  probe, logits)
    for name in eval_loaders:
        m = results[name]
        shown = f"accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  " if "accuracy" in m else ""
        run.log(f"{name}: {shown}loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}")
    run.log(f"export: {final}  (train {result['summary']['train_seconds']} s)")
    if ds.mode == "labels":
        report.write_for_run(run)
    hub.push_run(run)
    acc.end_training()


if __name__ == "__main__":
    guarded(main)
