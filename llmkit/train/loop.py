"""The training loop: accumulate, clip, step, log; evaluate and checkpoint on schedule; resume exactly.

It knows nothing of data formats, evaluation or publishing: it takes the loaders, an eval function and an
after-save callback. Accounting, guards, profiling and checkpoints live in their own modules."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

from torch.profiler import record_function
from tqdm.auto import tqdm

from llmkit import faults, rundir
from llmkit.data.lm import NOT_MODEL_INPUTS
from llmkit.data.streaming import StreamLoader, to_device
from llmkit.errors import LlmkitError
from llmkit.metrics import LOWER_IS_BETTER
from llmkit.train import checkpoint, optim, profiling
from llmkit.train.guards import LossScaleGuard, StopSignal
from llmkit.train.meter import Meter, per_rank
from llmkit.train.run import Run

EvalFn = Callable[[object, object, int], dict]  # (model, eval loader, step) -> metrics of the validation split
LossFn = Callable[[object, dict], object]  # (model outputs, batch) -> the loss to train on


def fit(run: Run, model, optimizer, train_loader, eval_loader, eval_fn: EvalFn,
        after_save: Callable[[object, Path], None] | None = None, loss_fn: LossFn | None = None) -> dict:
    """Train to train.max_steps (or train.epochs); returns {"model": the prepared model, "summary": numbers}.

    `eval_fn` scores the validation split at every eval; `after_save(model, path)` runs on every rank after
    each checkpoint is in place; `loss_fn(outputs, batch)` replaces the model's own loss (class weights)."""
    cfg, acc = run.cfg, run.accelerator
    t, c = cfg.train, cfg.checkpoint
    guard = LossScaleGuard(run) if run.precision == "fp16" else None
    stream = isinstance(train_loader, StreamLoader)  # data.streaming: sharded by rank already, no length
    if stream:
        steps_per_epoch = total_steps = t.max_steps  # one "epoch" is the run
    else:  # the loader length per rank is known only once Accelerate has sharded it
        train_loader = acc.prepare_data_loader(train_loader)
        steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
        total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    model, optimizer, eval_loader = acc.prepare(model, optimizer, eval_loader)
    if t.torch_compile:
        compiled = optim.compile_blocks(acc.unwrap_model(model))
        run.log(f"torch.compile: {compiled} transformer blocks (inductor, dynamic shapes); the first steps are slow")
    scheduler = optim.build_scheduler(t, optimizer, total_steps)
    acc.register_for_checkpointing(scheduler)
    state, rng = checkpoint.TrainerState(sampler_seed=t.seed), None
    if c.resume_from:
        path = rundir.resolve_checkpoint(run.output_dir, c.resume_from)
        state, rng = checkpoint.load(run, path, optimizer)
        if stream:
            train_loader.load_state_dict(rng["stream"])
        run.log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, batch {state.batches_in_epoch}")
    run.write_records(resumed_at=state.step if c.resume_from else None)
    batch_sampler = getattr(train_loader, "batch_sampler", None)
    inner_sampler = getattr(batch_sampler, "batch_sampler", batch_sampler)
    if run.elastic is not None and hasattr(inner_sampler, "per_step"):
        inner_sampler.per_step = run.elastic.saved_micro  # a new global batch keeps the checkpoint's sample order
    run.log(f"train: streamed, {total_steps} steps" if stream else f"train: {len(train_loader)} batches per rank per "
            f"epoch, {steps_per_epoch} optimizer steps per epoch, {total_steps} steps in all")
    model.train()
    meter = Meter(acc)
    profiler = profiling.profiler(run)
    if profiler is not None:
        profiler.start()
    stop = run.stop or StopSignal(acc)  # setup catches the signals for the whole run
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not acc.is_local_main_process)
    while state.step < total_steps:
        # Accelerate's loader sets its sampler's epoch from its own count of finished passes, which a resumed
        # run's first (skipping) pass does not advance: set both
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        if hasattr(inner_sampler, "set_epoch"):
            inner_sampler.set_epoch(state.epoch)
        # after a resume: skip the consumed batches by index, without loading them
        skip = 0 if stream else state.batches_in_epoch
        if stream:  # a resumed stream starts where its saved state points
            batches = (to_device(b, acc.device) for b in train_loader)
        else:
            batches = iter(acc.skip_first_batches(train_loader, skip) if skip else train_loader)
        if rng is not None:
            # starting an epoch's iterator draws from torch's RNG (and happens lazily, on the first batch);
            # the uninterrupted run drew it before the checkpoint, so restore the RNG only after that
            first = next(batches, None)
            checkpoint.set_rng_state(rng)
            rng = None
            batches = itertools.chain([first] if first is not None else [], batches)
        for batch in batches:
            if faults.TRACE:
                faults.trace_rows(state.step + 1, acc.process_index, batch)
            with acc.accumulate(model):
                with record_function("llmkit/forward"):
                    out = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
                    if loss_fn is not None:
                        out.loss = loss_fn(out, batch)
                if faults.ON and faults.hit("nan", state.step + 1, acc.process_index):
                    out.loss = out.loss * float("nan")
                meter.watch(out.loss, state.step + 1)
                if faults.ON:
                    faults.hit("kill", state.step + 1, acc.process_index)  # between forward and backward
                with record_function("llmkit/backward"):
                    acc.backward(out.loss)
                with record_function("llmkit/optimizer"):
                    grad_norm = None
                    if acc.sync_gradients and t.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED":
                        grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
            state.batches_in_epoch += 1
            meter.count(batch, out.loss)
            if not acc.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if profiler is not None:
                profiler.step()
            if faults.ON:
                faults.hit("sigterm", state.step, acc.process_index)
            if guard is not None:
                guard.step(model, state.step)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                if grad_norm is None and hasattr(model, "get_global_grad_norm"):
                    grad_norm = model.get_global_grad_norm()
                meter.stop_if_nonfinite(run.output_dir)
                rates = meter.scalars()
                scalars = {"train/loss": rates.pop("train/loss"), "train/lr": scheduler.get_last_lr()[0],
                           "train/epoch": state.step / steps_per_epoch, **rates}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                run.log_scalars(scalars, state.step)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}")
            end_of_epoch = not stream and acc.gradient_state.end_of_dataloader
            if end_of_epoch:  # the saved position is then the start of the next epoch
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            evaluated = (t.eval_every_steps and state.step % t.eval_every_steps == 0) or end_of_epoch \
                or state.step == total_steps
            # asked before the pause is timed: waiting here for a slower rank is training time
            interrupted = stop.agreed(acc)
            with meter.pause():
                if evaluated:
                    meter.stop_if_nonfinite(run.output_dir)
                    _evaluate(run, eval_fn, model, eval_loader, state, steps_per_epoch)
                if interrupted or (c.save_every_steps and state.step % c.save_every_steps == 0) \
                        or (c.save_every_epoch and end_of_epoch):
                    meter.stop_if_nonfinite(run.output_dir)  # never replace a good checkpoint with a diverged one
                    if evaluated:
                        state.history[-1]["checkpoint"] = f"step-{state.step}"
                    path = checkpoint.save(run, state, c.keep_last, c.keep_best,
                                           {"stream": train_loader.state_dict()} if stream else None)
                    run.log(f"checkpoint: {path}")
                    if after_save is not None:
                        after_save(model, path)
            if interrupted:
                raise LlmkitError(f"stopped by {stop.name or 'a signal on another rank'} after step {state.step}; "
                                  f"the checkpoint is in {run.output_dir / 'checkpoints'}. Continue with the same "
                                  "command plus --checkpoint.resume_from latest.")
            if end_of_epoch or state.step >= total_steps:
                break
    bar.close()
    if profiler is not None:
        profiler.stop()
    ranks = per_rank(acc, model, optimizer)
    summary = {"steps": state.step, "epochs": round(state.step / steps_per_epoch, 3), **meter.summary(),
               "world_size": acc.num_processes, "precision": run.precision, "zero_stage": run.zero_stage,
               "peak_memory_bytes": max(ranks["peak_memory_bytes"]),  # the largest rank's: what to provision
               "train_examples": train_loader.examples * acc.num_processes if stream else len(train_loader.dataset),
               "history": state.history, "per_rank": ranks}
    if run.elastic is not None:  # the resume changed how the global batch is split
        summary["elastic_resume"] = run.elastic.record()
    return {"model": model, "summary": summary}


def _evaluate(run: Run, eval_fn: EvalFn, model, loader, state: checkpoint.TrainerState, steps_per_epoch: int) -> None:
    """Score the validation split, log it, and add it to the history the best checkpoints are kept by."""
    best = run.cfg.checkpoint.best_metric
    metrics = eval_fn(model, loader, state.step)
    run.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, state.step)
    score = metrics.get(best)
    if score is not None and best in LOWER_IS_BETTER:
        score = -score
    state.history.append({"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), "score": score,
                          **metrics})
    run.log(f"eval step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples"))
