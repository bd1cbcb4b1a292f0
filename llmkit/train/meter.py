"""The loop's accounting: loss, tokens, rows, NaN/inf losses and throughput. The counters live on the device,
so counting costs no host-device sync per batch; they are read at logging steps and at the end."""

from __future__ import annotations

import contextlib
import resource
import time

import torch

from llmkit.data.lm import ROWS_KEY
from llmkit.errors import LlmkitError
from llmkit.rundir.checkpoints import latest_name
from llmkit.rundir.layout import RunDir


class Meter:
    """Counts what the loop did. Evaluation and checkpoint pauses are timed apart: throughput counts training
    steps only."""

    def __init__(self, accelerator):
        self.acc = accelerator
        device = accelerator.device
        self.seen_tokens, self.seen_rows = 0, 0  # padded positions and rows on this rank
        self.real_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.running_loss, self.running_n = torch.zeros((), device=device), 0
        # the first optimizer step whose loss was NaN/inf on this rank (0: none)
        self.nonfinite_at = torch.zeros((), dtype=torch.long, device=device)
        self.start = time.perf_counter()
        self.paused = 0.0  # seconds spent evaluating and checkpointing

    def watch(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if this batch's loss is NaN/inf (the first such step only)."""
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite_at = torch.where(bad & (self.nonfinite_at == 0), step, self.nonfinite_at)

    def count(self, batch: dict, loss: torch.Tensor) -> None:
        """One batch done: its loss and its tokens."""
        self.running_loss += loss.detach().float()
        self.running_n += 1
        mask = batch.get("attention_mask")
        if mask is None:  # a flattened batch (data.packing): no padding at all
            self.seen_tokens += batch["input_ids"].numel()
            self.seen_rows += batch[ROWS_KEY]
            self.real_tokens += batch["input_ids"].numel()
            return
        self.seen_tokens += mask.numel()
        self.seen_rows += mask.shape[0]
        self.real_tokens += mask.sum()

    @contextlib.contextmanager
    def pause(self):
        """Time spent in the block is not training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began

    def scalars(self) -> dict[str, float]:
        """Mean loss since the last call (over all ranks) and throughput so far; resets the running loss."""
        loss = self.acc.reduce(self.running_loss / max(self.running_n, 1), reduction="mean").item()
        self.running_loss.zero_()
        self.running_n = 0
        elapsed = time.perf_counter() - self.start - self.paused
        world = self.acc.num_processes
        return {"train/loss": loss, "train/real_tokens_per_s": self.real_tokens.item() * world / elapsed,
                "train/samples_per_s": self.seen_rows * world / elapsed}

    def stop_if_nonfinite(self, output_dir) -> None:
        """Stop (all ranks agree) when any rank saw a NaN/inf loss since the start, naming the first such step."""
        step = int(self.acc.gather(self.nonfinite_at.view(1)).max().item())
        if step:
            latest = latest_name(RunDir(output_dir).checkpoints)
            raise LlmkitError(f"the training loss became NaN/inf at step {step}: training diverged. "
                              f"{'The last good checkpoint is ' + latest if latest else 'No checkpoint was written'}; "
                              "nothing after step " + str(step - 1) + " was saved. Lower train.learning_rate, keep "
                              "train.max_grad_norm on, or use bf16/fp32 instead of fp16.")

    def summary(self) -> dict:
        """Wall time, time in steps, padding efficiency and throughput of the whole run."""
        elapsed = time.perf_counter() - self.start
        step_seconds = elapsed - self.paused
        real = self.real_tokens.item()
        world = self.acc.num_processes
        return {"train_seconds": round(elapsed, 1), "step_seconds": round(step_seconds, 2),
                "padding_efficiency": round(real / max(self.seen_tokens, 1), 4),
                "real_tokens_per_second": round(real * world / step_seconds, 1),
                "samples_per_second": round(self.seen_rows * world / step_seconds, 2)}


def peak_memory() -> int:
    """This rank's peak: allocated GPU memory, or on CPU the process's maximum resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def _innermost_optimizer(optimizer):
    """Follow the wrappers (Accelerate, DeepSpeed ZeRO, bf16) down to the torch optimizer that holds the state."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def per_rank(acc, model, optimizer) -> dict[str, list[int]]:
    """What each rank really holds, read from the engine (not assumed): parameter and optimizer-state elements,
    and its peak memory so far (ranks differ: rank 0 also evaluates and gathers)."""
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    state = _innermost_optimizer(optimizer).state
    states = sum(v.numel() for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    counts = acc.gather(torch.tensor([[params, states, peak_memory()]], device=acc.device)).tolist()
    return {"parameter_elements": [c[0] for c in counts], "optimizer_state_elements": [c[1] for c in counts],
            "peak_memory_bytes": [c[2] for c in counts]}
