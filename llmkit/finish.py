"""What follows training, one pipeline for both recipes (a recipe is setup / fit / finish): the final model scored
on every split (with prediction files where it classifies), the export and its check, the explanations, the
quantized copies, the report and the push to the Hub."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.evals import datamap, explain
from llmkit.evals.classification import write_predictions
from llmkit.metrics import averaging, scores_line
from llmkit.report import pages
from llmkit.ship import hub, quantize
from llmkit.train.loop import EvalFn
from llmkit.train.run import Run


@dataclass
class Task:
    """What differs between the recipes after training."""
    score: EvalFn  # the one fit scored validation with: (model, loader, step) -> (metrics, outputs or None)
    export: Callable[[object, dict, dict], Path]  # (model, results, outputs by split) -> final/, verified
    label_names: list[str] | None = None  # a classifier or label words: prediction files and explanations
    rows: dict = field(default_factory=dict)  # split -> its rows (text, label): prediction files, the data map
    results: dict = field(default_factory=dict)  # more for metrics.json (packing efficiency, a data mixture)


def finish(run: Run, fitted: dict, eval_loaders: dict, task: Task, uploader=None) -> None:
    """Everything after `fit` (its result is `fitted`), on every rank; the run ends here."""
    acc, cfg, net, summary = run.accelerator, run.cfg, fitted["model"], fitted["summary"]

    # evaluate the final model on every split; the eval fit made at its last step scored this very model
    labels = {"label_names": task.label_names, **averaging(task.label_names)} if task.label_names else {}
    results, outputs = {"train": summary, **labels, **task.results}, {}
    last = fitted.get("last_eval") or {}
    for name, loader in eval_loaders.items():
        if name == "validation" and last.get("step") == summary["steps"]:
            results[name], outputs[name] = last["metrics"], last["outputs"]
        else:
            results[name], outputs[name] = task.score(net, acc.prepare_data_loader(loader), None)
        if task.label_names and acc.is_main_process:
            write_predictions(run.dir.predictions(name), task.rows[name], outputs[name], task.label_names,
                              cfg.data.text_column, cfg.data.text_pair_column)

    # export, verified by a reload with plain transformers / peft
    final = task.export(net, results, outputs)
    for name in eval_loaders:
        run.log(f"{name}: " + scores_line(results[name], task.label_names))
    run.log(f"export: {final}  (train {summary['train_seconds']} s)")

    # why it said that: the export, on rank 0 (a failure there reaches every rank)
    if task.label_names and cfg.output.explain_rows:
        split = "test" if "test" in eval_loaders else "validation"
        run.main_first(lambda: explain.for_run(run.dir, split, cfg.output.explain_rows, cfg.train.seed,
                                               trust_remote_code=cfg.model.trust_remote_code, log=run.log,
                                               max_steps=cfg.output.explain_max_steps),
                       others=False)

    # quantized copies beside the export, each scored against it by its runtime (rank 0, fresh processes)
    if cfg.output.quantize:
        run.main_first(lambda: [quantize.quantize(final, name, log=run.log) for name in cfg.output.quantize],
                       others=False)

    # the data map of the training rows, from the dynamics fit recorded (rank 0)
    recorded = summary.get("training_dynamics", {}).get("scores")
    if task.label_names and "train" in task.rows and recorded:
        run.main_first(lambda: datamap.write_for_run(run.dir, task.rows["train"], task.label_names,
                                                     cfg.data.text_column, cfg.data.text_pair_column, recorded,
                                                     log=run.log), others=False)

    # the report, then the push
    pages.write_for_run(run)
    run.finish(skipped=hub.push_run(run, uploader))
