"""Fine-tune a sequence classifier: setup / train / evaluate / export.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/classification.py \
        --config recipes/configs/sentiment_minilm_polarity.yaml [--train.epochs 2 ...]
"""

from llmkit import data, engine, export, hub, model, report
from llmkit.cli import guarded, recipe_args
from llmkit.config import load_config


def main() -> None:
    # setup: the config is checked before any process group starts
    cfg = load_config(*recipe_args())
    run = engine.setup(cfg, hidden=model.hidden_size(cfg.model))
    acc = run.accelerator
    tokenizer = model.load_tokenizer(cfg.model)
    with acc.main_process_first():  # rank 0 tokenizes and fills the cache; the others read it
        ds = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log)
    run.log(f"data: train {len(ds.train)}, validation {len(ds.eval)}, test {len(ds.test) if ds.test else 0} rows; "
            f"labels {ds.label_names}")
    net = model.load_classifier(cfg.model, ds.label_names, pad_token_id=tokenizer.pad_token_id)
    optimizer = engine.build_optimizer(cfg, net)
    train_loader, eval_loaders = engine.dataloaders(run, ds, tokenizer)

    # train
    num_labels = len(ds.label_names)
    result = engine.train(run, net, optimizer, train_loader, eval_loaders["validation"],
                          lambda m, loader, step: engine.evaluate(run, m, loader, num_labels)[0])
    net = result["model"]

    # evaluate the final model on every split and keep the predictions
    results, splits = {"train": result["summary"], "label_names": ds.label_names}, {"validation": ds.eval_raw}
    if ds.test is not None:
        splits["test"] = ds.test_raw
    outputs = {}
    for name, raw in splits.items():
        loader = acc.prepare_data_loader(eval_loaders[name])
        results[name], outputs[name] = engine.evaluate(run, net, loader, num_labels)
        if acc.is_main_process:
            export.write_predictions(run.output_dir / f"predictions_{name}.jsonl", raw, outputs[name],
                                     ds.label_names, cfg.data.text_column)

    # export, verified by reloading with plain transformers
    check_split = "test" if ds.test is not None else "validation"
    final = export.save_final(run, net, tokenizer, results, (splits[check_split], outputs[check_split]))
    for name in splits:
        m = results[name]
        run.log(f"{name}: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  ({m['samples']} rows)")
    run.log(f"export: {final}  (train {result['summary']['train_seconds']} s)")
    report.write_for_run(run)
    hub.push_run(run)
    acc.end_training()


if __name__ == "__main__":
    guarded(main)
