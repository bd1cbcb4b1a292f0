"""Fine-tune a sequence classifier: setup / fit / finish.

    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/classification.py \
        --config recipes/configs/sentiment_minilm_polarity.yaml [--train.epochs 2 ...]
"""

from llmkit import model
from llmkit.commands.entry import guarded, recipe_args
from llmkit.config import load_config
from llmkit.data import classification, loaders
from llmkit.evals.classification import score_split
from llmkit.finish import Task, finish
from llmkit.ship import every_save, export
from llmkit.train import dynamics, losses, optim
from llmkit.train.loop import fit
from llmkit.train.run import run_tokenizer, setup


def main() -> None:
    # setup: every check runs before the process group starts
    cfg = load_config(*recipe_args())
    run = setup(cfg, "classification")
    acc = run.accelerator
    tokenizer = run_tokenizer(run)
    # rank 0 tokenizes and fills the cache; the others read it
    ds = run.main_first(lambda: classification.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=run.log))
    run.identify_data(ds.train, ds.label_names)
    run.log(f"data: train {len(ds.train)}, validation {len(ds.validation)}, test {len(ds.test) if ds.test else 0} "
            f"rows; labels {ds.label_names}")
    # checked against the labels before the model loads; rank 0's error is every rank's, said once
    loss_fn, weighted = run.main_first(lambda: losses.for_run(run.log, cfg.train.class_weights, ds.train["labels"],
                                                              ds.label_names))
    net = model.load_classifier(cfg.model, ds.label_names, pad_token_id=tokenizer.pad_token_id, lora=cfg.lora,
                                precision=run.precision, zero3=run.zero_stage == 3, log=run.log)
    optimizer = optim.build_optimizer(cfg, net)
    train_loader, eval_loaders = loaders.classification_loaders(cfg, ds, tokenizer, acc.process_index,
                                                                acc.num_processes)

    # fit
    def score(m, loader, step):
        return score_split(run, m, loader, len(ds.label_names))

    uploader = every_save.uploader(run, tokenizer)
    fitted = fit(run, net, optimizer, train_loader, eval_loaders["validation"], score, after_save=uploader,
                 loss_fn=loss_fn, recorder=dynamics.for_classifier(run))
    fitted["summary"].update(weighted)

    # finish: every split scored, the export checked against the run's own logits, explanations, report, push
    check = "test" if ds.test is not None else "validation"
    finish(run, fitted, eval_loaders, Task(
        score, lambda m, results, out: export.save_classifier(run, m, tokenizer, results, ds.rows[check], out[check]),
        ds.label_names, ds.rows), uploader)


if __name__ == "__main__":
    guarded(main, end=True)
