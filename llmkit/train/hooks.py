"""What watches the training loop from outside its step, each called at a named point of it: the progress bar,
the profiler, the fp16 loss-scale watchdog, and (for the crash tests only; free unless LLMKIT_FAULT or
LLMKIT_TRACE_ROWS is set) fault injection and the trace of the rows each step trains on."""

from __future__ import annotations

from tqdm.auto import tqdm

from llmkit import faults
from llmkit.train import profiling
from llmkit.train.guards import LossScaleGuard


class Hooks:
    def __init__(self, run, total_steps: int, done: int):
        acc = run.accelerator
        self.rank = acc.process_index
        self.bar = tqdm(total=total_steps, initial=done, desc="train", disable=not acc.is_local_main_process)
        self.profiler = profiling.profiler(run)
        if self.profiler is not None:
            self.profiler.start()
        self.guard = LossScaleGuard(run) if run.precision == "fp16" else None

    def batch(self, step: int, batch: dict) -> None:
        """Before the forward of a micro-batch of optimizer step `step`."""
        if faults.TRACE:
            faults.trace_rows(step, self.rank, batch)

    def loss(self, step: int, loss):
        """After the forward, before the backward: the loss to train on."""
        if faults.ON:
            if faults.hit("nan", step, self.rank):
                loss = loss * float("nan")
            if faults.from_step("overflow", step, self.rank):
                loss = loss * 1e30
            faults.hit("kill", step, self.rank)
        return loss

    def stepped(self, model, step: int) -> None:
        """After optimizer step `step`."""
        self.bar.update(1)
        if self.profiler is not None:
            self.profiler.step()
        if faults.ON:
            faults.hit("sigterm", step, self.rank)
        if self.guard is not None:
            self.guard.step(model, step)

    def logged(self, scalars: dict) -> None:
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}")

    def close(self) -> None:
        self.bar.close()
        if self.profiler is not None:
            self.profiler.stop()
