"""Fine-tune a sequence classifier: setup / train / evaluate / export.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/classification.py \
        --config recipes/configs/sentiment_minilm_polarity.yaml [--train.epochs 2 ...]
"""

from llmkit import model
from llmkit.cli import guarded, recipe_args
from llmkit.config import load_config
from llmkit.data import classification, loaders
from llmkit.evals import explain
from llmkit.evals.classification import evaluate, write_predictions
from llmkit.report import pages
from llmkit.ship import every_save, export, hub
from llmkit.train import losses, optim
from llmkit.train.loop import fit
from llmkit.train.run import setup


def main() -> None:
    # setup: every check runs before the process group starts
    cfg = load_config(*recipe_args())
    run = setup(cfg, "classification")
    acc = run.accelerator
    tokenizer = model.load_tokenizer(cfg.model)
    # rank 0 tokenizes and fills the cache; the others read it
    ds = run.main_first(lambda: classification.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log))
    run.identify_data(ds.train, ds.label_names)
    run.log(f"data: train {len(ds.train)}, validation {len(ds.validation)}, test {len(ds.test) if ds.test else 0} "
            f"rows; labels {ds.label_names}")
    net = model.load_classifier(cfg.model, ds.label_names, pad_token_id=tokenizer.pad_token_id, lora=cfg.lora,
                                precision=run.precision, zero3=run.zero_stage == 3)
    optimizer = optim.build_optimizer(cfg, net)
    train_loader, eval_loaders = loaders.classification_loaders(cfg, ds, tokenizer, acc.process_index,
                                                                acc.num_processes)

    # train
    num_labels = len(ds.label_names)
    uploader = every_save.uploader(run, tokenizer)
    loss_fn, weighted = losses.for_run(run.log, cfg.train.class_weights, ds.train["labels"], ds.label_names)
    result = fit(run, net, optimizer, train_loader, eval_loaders["validation"],
                 lambda m, loader, step: evaluate(run, m, loader, num_labels)[0], after_save=uploader,
                 loss_fn=loss_fn)
    result["summary"].update(weighted)
    net = result["model"]

    # evaluate the final model on every split and keep the predictions
    results, outputs = {"train": result["summary"], "label_names": ds.label_names}, {}
    for name, loader in eval_loaders.items():
        results[name], outputs[name] = evaluate(run, net, acc.prepare_data_loader(loader), num_labels)
        if acc.is_main_process:
            write_predictions(run.output_dir / f"predictions_{name}.jsonl", ds.rows[name], outputs[name],
                              ds.label_names, cfg.data.text_column, cfg.data.text_pair_column)

    # export, verified by reloading with plain transformers
    check = "test" if ds.test is not None else "validation"
    final = export.save_classifier(run, net, tokenizer, results, ds.rows[check], outputs[check])
    for name in eval_loaders:
        m = results[name]
        run.log(f"{name}: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  ({m['samples']} rows)")
    run.log(f"export: {final}  (train {result['summary']['train_seconds']} s)")
    if cfg.output.explain_rows:  # why it said that: the exported model, on rank 0 (its failure reaches every rank)
        run.main_first(lambda: explain.for_run(run.output_dir, check, cfg.output.explain_rows, cfg.train.seed,
                                               trust_remote_code=cfg.model.trust_remote_code, log=run.log),
                       others=False)
    pages.write_for_run(run)
    run.finish(skipped=hub.push_run(run, uploader))


if __name__ == "__main__":
    guarded(main, end=True)
