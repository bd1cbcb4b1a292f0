"""Fine-tune a causal LM (full or LoRA) on packed text, prompt/response or chat rows, or label words (generative
classification): setup / train / evaluate / export.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/causal_lm.py \
        --config recipes/configs/sentiment_smollm2_lora.yaml [--lora.r 8 ...]
"""

from llmkit import model
from llmkit.cli import guarded, recipe_args
from llmkit.config import load_config
from llmkit.data import lm, loaders
from llmkit.evals import explain
from llmkit.evals import lm as lm_eval
from llmkit.evals.classification import write_predictions
from llmkit.report import pages
from llmkit.ship import every_save, export, hub
from llmkit.train import losses, optim
from llmkit.train.loop import fit
from llmkit.train.run import load_tokenizer, setup


def main() -> None:
    # setup: every check runs before the process group starts
    cfg = load_config(*recipe_args())
    run = setup(cfg, "causal_lm")
    acc = run.accelerator
    tokenizer = load_tokenizer(run)  # from-scratch runs without one: trained on the train split first
    ds = run.main_first(lambda: lm.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log))
    run.identify_data(ds.train, ds.label_names)
    run.log(f"data: {ds.mode}, train {'streamed' if ds.streamed else len(ds.train)}, validation "
            f"{len(ds.validation)} examples"
            + (f"; label words {ds.label_words}" if ds.label_words else "")
            + ("; rows packed padding-free" if cfg.data.packing and ds.mode != "packed" else ""))
    net = model.load_causal_lm(cfg.model, cfg.lora, tokenizer, precision=run.precision, zero3=run.zero_stage == 3)
    optimizer = optim.build_optimizer(cfg, net)
    train_loader, eval_loaders = loaders.lm_loaders(cfg, ds, tokenizer, acc.process_index, acc.num_processes)
    labels = ds.mode == "labels"
    last = {}  # the latest validation scores, reused when training ended with an eval (it always does)

    def evaluate(m, loader, step=None):  # step: an eval during training, which also logs sample completions
        if step is not None:
            lm_eval.log_samples(run, m, tokenizer, step)
        if labels:
            metrics, out = lm_eval.score_labels(run, m, loader, len(ds.label_names))
        else:
            metrics, out = lm_eval.evaluate_lm(run, m, loader), None
        last.update(step=step, metrics=metrics, out=out)
        return metrics

    # train
    uploader = every_save.uploader(run, tokenizer)
    loss_fn, weighted = losses.for_run(run.log, cfg.train.class_weights, ds.train[losses.CLASS_KEY] if labels else [],
                                       ds.label_names, tokens=True)
    result = fit(run, net, optimizer, train_loader, eval_loaders["validation"], evaluate, after_save=uploader,
                 loss_fn=loss_fn)
    result["summary"].update(weighted)
    net = result["model"]

    # evaluate the final model (generative classification: every split, with prediction files)
    results = {"train": result["summary"], **({"label_names": ds.label_names} if labels else {})}
    for name, loader in eval_loaders.items():
        if not (name == "validation" and last.get("step") == result["summary"]["steps"]):
            evaluate(net, acc.prepare_data_loader(loader))
        results[name] = last["metrics"]
        if labels and acc.is_main_process:
            write_predictions(run.output_dir / f"predictions_{name}.jsonl", ds.rows[name], last["out"],
                              ds.label_names, cfg.data.text_column, cfg.data.text_pair_column)
    if ds.packing is not None:
        results["packing_efficiency"] = ds.packing.efficiency
    if ds.sources:
        results["data_mixture"] = ds.sources

    # export (adapter + merged for LoRA), verified by reloading with plain transformers / peft
    final = export.save_causal_lm(run, net, tokenizer, results, ds.probe)
    for name in eval_loaders:
        m = results[name]
        shown = f"accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  " if "accuracy" in m else ""
        run.log(f"{name}: {shown}loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}")
    run.log(f"export: {final}  (train {result['summary']['train_seconds']} s)")
    if labels and cfg.output.explain_rows:  # why it said that: the export, on rank 0 (its failure reaches every rank)
        split = "test" if ds.test is not None else "validation"
        run.main_first(lambda: explain.for_run(run.output_dir, split, cfg.output.explain_rows, cfg.train.seed,
                                               trust_remote_code=cfg.model.trust_remote_code, log=run.log),
                       others=False)
    pages.write_for_run(run)  # classification numbers for label words; loss, perplexity and the data otherwise
    run.finish(skipped=hub.push_run(run, uploader))


if __name__ == "__main__":
    guarded(main, end=True)
