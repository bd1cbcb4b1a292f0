"""Fine-tune a causal LM (full or LoRA) on packed text, prompt/response or chat rows, or label words (generative
classification): setup / fit / finish.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/causal_lm.py \
        --config recipes/configs/sentiment_smollm2_lora.yaml [--lora.r 8 ...]
"""

from llmkit import model
from llmkit.commands.entry import guarded, recipe_args
from llmkit.config import load_config
from llmkit.data import lm, loaders
from llmkit.evals import lm as lm_eval
from llmkit.finish import Task, finish
from llmkit.ship import every_save, export
from llmkit.train import dynamics, losses, optim
from llmkit.train.loop import fit
from llmkit.train.run import run_tokenizer, setup


def main() -> None:
    # setup: every check runs before the process group starts
    cfg = load_config(*recipe_args())
    run = setup(cfg, "causal_lm")
    acc = run.accelerator
    tokenizer = run_tokenizer(run)  # from-scratch runs without one: trained on the train split first
    ds = run.main_first(lambda: lm.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log))
    run.identify_data(ds.train, ds.label_names)
    run.log(f"data: {ds.mode}, train {'streamed' if ds.streamed else len(ds.train)}, validation "
            f"{len(ds.validation)} examples"
            + (f"; label words {ds.label_words}" if ds.label_words else "")
            + ("; rows packed padding-free" if cfg.data.packing and ds.mode != "packed" else ""))
    labels = ds.mode == "labels"
    # checked against the labels before the model loads; rank 0's error is every rank's, said once
    loss_fn, weighted = run.main_first(lambda: losses.for_run(run.log, cfg.train.class_weights if labels else None,
                                       ds.train[losses.CLASS_KEY] if labels else [], ds.label_names, tokens=True))
    net = model.load_causal_lm(cfg.model, cfg.lora, tokenizer, run.precision, zero3=run.zero_stage == 3, log=run.log)
    optimizer = optim.build_optimizer(cfg, net)
    train_loader, eval_loaders = loaders.lm_loaders(cfg, ds, tokenizer, acc.process_index, acc.num_processes)

    # fit
    def score(m, loader, step):  # an eval during training also logs sample completions
        if step is not None:
            lm_eval.log_samples(run, m, tokenizer, step)
        if labels:  # generative classification: each label word's likelihood, classifier metrics
            return lm_eval.score_labels(run, m, loader, len(ds.label_names))
        return lm_eval.score_text(run, m, loader), None

    uploader = every_save.uploader(run, tokenizer)
    fitted = fit(run, net, optimizer, train_loader, eval_loaders["validation"], score, after_save=uploader,
                 **losses.causal_lm_step(run, net, loss_fn), recorder=dynamics.for_label_words(run, tokenizer, ds))
    fitted["summary"].update(weighted)

    # finish: every split scored, the export (adapter + merged for LoRA) checked, explanations, report, push
    finish(run, fitted, eval_loaders, Task(
        score, lambda m, results, out: export.save_causal_lm(run, m, tokenizer, results, ds.probe),
        ds.label_names if labels else None, ds.rows if labels else {}, ds.facts), uploader)


if __name__ == "__main__":
    guarded(main, end=True)
