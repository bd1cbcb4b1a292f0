"""The training loop: accumulate, clip, step, log; evaluate and checkpoint on schedule; resume exactly.

It knows nothing of data formats, evaluation or publishing: it takes the loaders, an eval function and an
after-save callback. Where it is in the data (train/position.py), what watches it (train/hooks.py: progress,
profiler, fp16 watchdog, fault injection), accounting (train/meter.py) and checkpoints (llmkit.rundir) live in
their own modules."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from torch.profiler import record_function

from llmkit.data.lm import NOT_MODEL_INPUTS
from llmkit.data.streaming import StreamLoader
from llmkit.errors import LlmkitError
from llmkit.metrics import LOWER_IS_BETTER
from llmkit.rundir import checkpoints, layout
from llmkit.train import optim
from llmkit.train.guards import StopSignal, loss_scale
from llmkit.train.hooks import Hooks
from llmkit.train.meter import Meter, memory_line, memory_summary, per_rank
from llmkit.train.position import DataPosition
from llmkit.train.run import Run

# (model, eval loader, step or None after training) -> (metrics, per-row outputs or None) of that split
EvalFn = Callable[[object, object, int | None], tuple[dict, dict | None]]
LossFn = Callable[[object, dict], object]  # (model outputs, batch) -> the loss to train on
ForwardFn = Callable[[object, dict], object]  # (model, batch) -> its outputs, their .loss the loss to train on


def fit(run: Run, model, optimizer, train_loader, eval_loader, eval_fn: EvalFn,
        after_save: Callable[[object, Path], None] | None = None, loss_fn: LossFn | None = None,
        recorder=None, forward: ForwardFn | None = None) -> dict:
    """Train to train.max_steps (or train.epochs); returns {"model": the prepared model, "summary": numbers,
    "last_eval": the last validation eval (step, metrics, outputs) or None}.

    `eval_fn` scores the validation split at every eval; `after_save(model, path)` runs on every rank after
    each checkpoint is in place; `loss_fn(outputs, batch)` replaces the model's own loss (class weights);
    `forward(model, batch)` replaces the model call and its loss (a causal LM's chunked loss, llmkit.model.lm_head);
    `recorder` (llmkit.train.dynamics) keeps each training row's scores from the step's own forward."""
    acc, t, c = run.accelerator, run.cfg.train, run.cfg.checkpoint

    # setup: the data sharded by rank, model and optimizer prepared, the LR schedule, a checkpoint restored
    stream = isinstance(train_loader, StreamLoader)  # data.streaming: one pass is the run, its length unknown
    if not stream:  # the loader's length per rank is known only once Accelerate has sharded it
        train_loader = acc.prepare_data_loader(train_loader)
    steps_per_epoch = t.max_steps if stream else math.ceil(len(train_loader) / run.accumulation)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    model, optimizer, eval_loader = acc.prepare(model, optimizer, eval_loader)
    if t.torch_compile:
        compiled = optim.compile_blocks(acc.unwrap_model(model))
        run.log(f"torch.compile: {compiled} transformer blocks (inductor, dynamic shapes); the first steps are slow")
    scheduler = optim.build_scheduler(t, optimizer, total_steps)
    acc.register_for_checkpointing(scheduler)
    state, saved = checkpoints.load(run, optimizer) if run.resume else (checkpoints.TrainerState(), None)
    position = DataPosition(run, train_loader, state, saved)
    if recorder is not None:
        recorder.start(state, run.resume.path if run.resume else None, stream)
    run.write_records(resumed_at=state.step if run.resume else None)
    run.log(f"train: streamed, {total_steps} steps" if stream else f"train: {len(train_loader)} batches per rank per "
            f"epoch, {steps_per_epoch} optimizer steps per epoch, {total_steps} steps in all")
    meter, stop, last_eval = Meter(acc), run.stop or StopSignal(acc), None
    hooks = Hooks(run, total_steps, state.step, recorder)
    hooks.started(model, scheduler)

    # train: a step is `run.accumulation` micro-batches; then log, evaluate and checkpoint on their schedules
    model.train()
    while state.step < total_steps:
        for batch in position.epoch():
            loss, grad_norm = _micro_batch(run, model, optimizer, scheduler, batch, loss_fn, hooks, meter, state.step,
                                           forward)
            meter.count(batch, loss)
            if not acc.sync_gradients:
                continue
            state.step += 1
            hooks.stepped(model, state.step)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                _log(run, model, meter, scheduler, hooks, grad_norm, state.step / steps_per_epoch, state.step)
            end_of_epoch = position.end_of_epoch()
            if end_of_epoch:
                hooks.flush()
            evaluated = (t.eval_every_steps and state.step % t.eval_every_steps == 0) or end_of_epoch \
                or state.step == total_steps
            interrupted = stop.agreed(acc)  # asked before the pause is timed: waiting for a slower rank is training
            with meter.pause():
                if evaluated:
                    meter.stop_if_nonfinite(run.dir)
                    last_eval = _evaluate(run, eval_fn, model, eval_loader, state, steps_per_epoch)
                if interrupted or (c.save_every_steps and state.step % c.save_every_steps == 0) \
                        or (c.save_every_epoch and end_of_epoch):
                    _checkpoint(run, model, state, position, evaluated, meter, after_save, hooks)
            if interrupted:
                raise LlmkitError(f"stopped by {stop.name or 'a signal on another rank'} after step {state.step}; "
                                  f"the checkpoint is in {run.dir.checkpoints}. Continue with the same command plus "
                                  "--checkpoint.resume_from latest.")
            if end_of_epoch or state.step >= total_steps:
                break
    hooks.close()

    # summary
    ranks = per_rank(acc, model, optimizer, meter.peaks)
    memory = memory_summary(ranks, run.live_estimate)  # the largest rank's: what to provision
    run.log(memory_line(memory))
    summary = {"steps": state.step, "epochs": round(state.step / steps_per_epoch, 3), **meter.summary(),
               "world_size": acc.num_processes, "precision": run.precision, "zero_stage": run.zero_stage,
               **memory, "train_examples": position.examples(), "history": state.history, "per_rank": ranks,
               **hooks.summary()}
    if run.elastic is not None:  # the resume changed how the global batch is split
        summary["elastic_resume"] = run.elastic.record()
    return {"model": model, "summary": summary, "last_eval": last_eval}


def _micro_batch(run: Run, model, optimizer, scheduler, batch: dict, loss_fn: LossFn | None, hooks: Hooks,
                 meter: Meter, done: int, forward: ForwardFn | None = None):
    """Forward and backward of one micro-batch of step `done` + 1; on its last one, clip and step. Returns the
    loss and the gradient norm where it was clipped here (DeepSpeed clips, and reports it, itself)."""
    acc, t = run.accelerator, run.cfg.train
    hooks.batch(done + 1, batch)
    with acc.accumulate(model):
        with record_function("llmkit/forward"):
            if forward is not None:
                out = forward(model, batch)
            else:
                out = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
            loss = hooks.loss(done + 1, loss_fn(out, batch) if loss_fn is not None else out.loss)
        with record_function("llmkit/dynamics"):  # its own span: what recording costs a step
            hooks.forward(done + 1, out, batch)
        meter.watch(loss, done + 1)
        with record_function("llmkit/backward"):
            acc.backward(loss)
        with record_function("llmkit/optimizer"):
            grad_norm = None
            if acc.sync_gradients and t.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED":
                grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    return loss, grad_norm


def _log(run: Run, model, meter: Meter, scheduler, hooks: Hooks, grad_norm, epoch: float, step: int) -> None:
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()
    meter.stop_if_nonfinite(run.dir)
    rates = meter.scalars()
    scalars = {"train/loss": rates.pop("train/loss"), "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch,
               **rates}
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    if run.precision == "fp16":  # the dynamic loss scale's trajectory (the watchdog reads it every step)
        scale = loss_scale(run.accelerator, model)
        if scale is not None:
            scalars["train/loss_scale"] = scale
    run.log_scalars(scalars, step)
    hooks.logged(scalars)


def _checkpoint(run: Run, model, state: checkpoints.TrainerState, position: DataPosition, evaluated: bool,
                meter: Meter, after_save, hooks: Hooks) -> None:
    c = run.cfg.checkpoint
    meter.stop_if_nonfinite(run.dir)  # never replace a good checkpoint with a diverged one
    if evaluated:
        state.history[-1]["checkpoint"] = layout.checkpoint_name(state.step)
    hooks.flush()  # the checkpoint keeps the training dynamics up to its step
    path = checkpoints.save(run, state, c.keep_last, c.keep_best, position.saved(), hooks.into_checkpoint)
    run.log(f"checkpoint: {path}")
    if after_save is not None:
        after_save(model, path)


def _evaluate(run: Run, eval_fn: EvalFn, model, loader, state: checkpoints.TrainerState, steps_per_epoch: int
              ) -> dict:
    """Score the validation split, log it, and add it to the history the best checkpoints are kept by."""
    best = run.cfg.checkpoint.best_metric
    metrics, outputs = eval_fn(model, loader, state.step)
    run.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, state.step)
    score = metrics.get(best)
    if score is not None and best in LOWER_IS_BETTER:
        score = -score
    state.history.append({"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), "score": score,
                          **metrics})
    run.log(f"eval step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples"))
    return {"step": state.step, "metrics": metrics, "outputs": outputs}
