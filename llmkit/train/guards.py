"""What stops a run cleanly: SIGTERM / SIGINT (all ranks agree, a checkpoint is written) and an fp16 loss scale
stuck at its floor."""

from __future__ import annotations

import signal
from datetime import timedelta

import torch
from accelerate import Accelerator

from llmkit.errors import LlmkitError


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, the ranks agree, a checkpoint is written."""

    def __init__(self, acc: Accelerator, timeout: timedelta | None = None):
        self.name = None
        self._old = {sig: signal.signal(sig, self._catch) for sig in (signal.SIGTERM, signal.SIGINT)}
        # the flag travels through a host-side (gloo) group: asking every step must not wait for the GPU
        self.group = None
        if acc.num_processes > 1 and acc.device.type != "cpu":
            self.group = torch.distributed.new_group(backend="gloo", timeout=timeout)

    def _catch(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self, acc: Accelerator) -> bool:
        """True on every rank as soon as any rank got a signal (one tiny host all-reduce per step)."""
        flag = torch.tensor(1.0 if self.name else 0.0)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(flag, group=self.group)
        return bool(flag > 0)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class LossScaleWatchdog:
    """Stops an fp16 run whose dynamic loss scale sits at its floor: every step then overflows or underflows."""

    def __init__(self, patience: int, floor: float = 1.0):
        self.patience, self.floor, self.at_floor = patience, floor, 0

    def update(self, scale: float | None, step: int, steps: int = 1) -> None:
        """`scale` as read at `step`, `steps` optimizer steps after the previous reading."""
        if scale is None:
            return
        self.at_floor = self.at_floor + steps if scale <= self.floor else 0
        if self.at_floor >= self.patience:
            raise LlmkitError(f"the fp16 loss scale has been at its minimum ({scale:g}) for {self.at_floor} steps "
                              f"(step {step}): gradients keep overflowing and training is skipping updates. Use "
                              "precision bf16 (or fp32), lower train.learning_rate, or check the data for outliers.")


def loss_scale(accelerator: Accelerator, model) -> float | None:
    """The current fp16 loss scale (DeepSpeed or torch GradScaler), or None when there is none."""
    optimizer = getattr(model, "optimizer", None)  # the DeepSpeed engine's optimizer
    for holder in (optimizer, getattr(optimizer, "loss_scaler", None)):
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(holder, attr, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


class LossScaleGuard:
    """The watchdog fed at the right moments: DeepSpeed keeps the fp16 scale as a Python number (read every
    step); torch's GradScaler keeps it on the GPU, so it is read only at logging steps (no GPU wait per step)."""

    def __init__(self, run):
        t = run.cfg.train
        floor = float(((run.ds_config or {}).get("fp16") or {}).get("min_loss_scale", 1))
        self.watchdog = LossScaleWatchdog(patience=t.loss_scale_patience, floor=floor)
        self.every = 1 if run.ds_config else t.logging_steps
        self.accelerator = run.accelerator

    def step(self, model, step: int) -> None:
        if step % self.every == 0:
            self.watchdog.update(loss_scale(self.accelerator, model), step, steps=self.every)
