"""What watches the training loop from outside its step, each called at a named point of it: the progress bar,
the profiler, the fp16 loss-scale watchdog, the training dynamics' recorder a recipe hands in, and (for the crash
tests only; free unless LLMKIT_FAULT or LLMKIT_TRACE_ROWS is set) fault injection and the trace of the rows each
step trains on; check-numerics' record and its planted numerics faults (llmkit.train.recording)."""

from __future__ import annotations

from tqdm.auto import tqdm

from llmkit import faults
from llmkit.train import profiling, recording
from llmkit.train.guards import LossScaleGuard

FLUSH_STEPS = 500  # the training dynamics go to their file at least this often (and at each epoch's end)


class Hooks:
    def __init__(self, run, total_steps: int, done: int, recorder=None):
        acc = run.accelerator
        self.recorder = recorder  # llmkit.train.dynamics.Recorder, or None
        self.rank = acc.process_index
        self.bar = tqdm(total=total_steps, initial=done, desc="train", disable=not acc.is_local_main_process)
        self.profiler = profiling.profiler(run)
        if self.profiler is not None:
            self.profiler.start()
        self.guard = LossScaleGuard(run) if run.precision == "fp16" else None
        self.numerics = recording.Watch(run) if recording.wanted() else None

    def started(self, model, scheduler) -> None:
        """Before the first step, the model and the LR schedule prepared."""
        if self.numerics is not None:
            self.numerics.started(model, scheduler)

    def batch(self, step: int, batch: dict) -> None:
        """Before the forward of a micro-batch of optimizer step `step`."""
        if faults.TRACE:
            faults.trace_rows(step, self.rank, batch)
        if self.numerics is not None:
            self.numerics.batch(step, batch)

    def forward(self, step: int, outputs, batch: dict) -> None:
        """After the forward of a micro-batch: the rows' scores for the training dynamics."""
        if self.recorder is not None:
            self.recorder.batch(step, outputs, batch)

    def flush(self) -> None:
        """Every rank, at the end of an epoch, before a checkpoint and at the end: the recorded rows to the file."""
        if self.recorder is not None:
            self.recorder.flush()

    def into_checkpoint(self, folder) -> None:
        """Rank 0, while a checkpoint is written: what the hooks keep beside it (the dynamics so far)."""
        if self.recorder is not None:
            self.recorder.into_checkpoint(folder)

    def loss(self, step: int, loss):
        """After the forward, before the backward: the loss to train on."""
        if faults.ON:
            if faults.hit("nan", step, self.rank):
                loss = loss * float("nan")
            if faults.from_step("overflow", step, self.rank):
                loss = loss * 1e30
            faults.hit("kill", step, self.rank)
        if self.numerics is not None:
            loss = self.numerics.loss(step, loss)
        return loss

    def stepped(self, model, step: int) -> None:
        """After optimizer step `step`."""
        self.bar.update(1)
        if self.recorder is not None and step % FLUSH_STEPS == 0:
            self.recorder.flush()  # what each rank holds, and what one gather moves, stays bounded in a long epoch
        if self.profiler is not None:
            self.profiler.step()
        if faults.ON:
            faults.hit("sigterm", step, self.rank)
        if self.numerics is not None:
            self.numerics.stepped(model, step)
        if self.guard is not None:
            self.guard.step(model, step)

    def logged(self, scalars: dict) -> None:
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}")

    def summary(self) -> dict:
        """What the run's summary (metrics.json "train") says of the hooks: the training dynamics' recording."""
        return {"training_dynamics": self.recorder.summary()} if self.recorder is not None else {}

    def close(self) -> None:
        """Every rank, after the last step: the last recorded rows to the file, the bar and profiler closed."""
        if self.recorder is not None:
            self.recorder.flush()
        self.bar.close()
        if self.profiler is not None:
            self.profiler.stop()
