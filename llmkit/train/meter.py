"""The loop's accounting: loss, tokens, rows, NaN/inf losses and throughput. The counters live on the device,
so counting costs no host-device sync per batch; they are read at logging steps and at the end."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import threading
import time

import torch

from llmkit.data.lm import ROWS_KEY
from llmkit.errors import LlmkitError
from llmkit.memory import LIVE
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
        self.peaks = PhasePeaks()  # everything before this point is the load phase

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

    def stop_if_nonfinite(self, run: RunDir) -> None:
        """Stop (all ranks agree) when any rank saw a NaN/inf loss since the start, naming the first such step."""
        step = int(self.acc.gather(self.nonfinite_at.view(1)).max().item())
        if step:
            latest = latest_name(run.checkpoints)
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


def _host_peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def _resident_high_water() -> int | None:
    """VmHWM: the peak resident set since the process started or since it was last reset (Linux), else None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class LiveSampler:
    """On a CPU, the most memory live at once, sampled every `interval` seconds by a daemon thread: the resident set
    less the bytes glibc's malloc holds free (freed tensors it keeps for reuse, which RSS still counts). It is the
    quantity the estimate's "live at peak" predicts, as max_memory_allocated is on a GPU. Samples, so a spike
    shorter than the interval can pass unseen; None where glibc's mallinfo2 or /proc is missing."""

    def __init__(self, interval: float = 0.01):
        self.peak, self._stop, self._thread, self.measured = 0, threading.Event(), None, False
        try:
            libc = ctypes.CDLL(None)
            self._mallinfo = libc.mallinfo2
            self._mallinfo.restype = _MallInfo2
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        except (OSError, AttributeError):
            return
        self._page, self.measured = os.sysconf("SC_PAGE_SIZE"), True
        self.sample()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="llmkit-live-memory", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        resident = int(os.pread(self._statm, 128, 0).split()[1]) * self._page
        self.peak = max(self.peak, resident - self._mallinfo().fordblks)

    def _run(self, interval: float) -> None:
        # mallinfo2 walks malloc's free lists holding each arena's lock: milliseconds on a training process's heap
        # (5.8 ms measured), during which the training thread's allocations wait. Every 10 ms, that made a 2-rank
        # CPU run ~15% slower; waiting 20x the last sample's cost bounds the sampler to ~5% of a core and of
        # malloc's time, however slow a sample gets (the peak of a step that lasts seconds is still seen)
        wait = interval
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self.sample()
            wait = max(interval, 20 * (time.perf_counter() - start))

    def stop(self) -> int | None:
        """Stop sampling (once); the peak in bytes, or None when it could not be measured."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()
            os.close(self._statm)
            self._thread = None
        return self.peak if self.measured else None


class PhasePeaks:
    """Peak memory by phase, so the estimate's two columns can be checked apart: the load phase (imports, data,
    model load, DeepSpeed's setup: host memory) and training, the device held (a GPU's reserved peak, what torch's
    caching allocator took; or on CPU the resident set's high-water mark, reset once loading is over: Linux resets
    it when "5" is written to /proc/self/clear_refs). Beside it, training's live peak: the quantity the estimate
    predicts (a GPU's max_memory_allocated; on a CPU, LiveSampler)."""

    def __init__(self):
        self.load_host = self.load_device = _host_peak()
        self.split, self.sampler = True, None
        if torch.cuda.is_available():
            self.load_device = int(torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
            return
        self.sampler = LiveSampler()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:  # not Linux, or not allowed: training's peak is not told apart from the load's
            self.split = False

    def train(self) -> int:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_reserved())
        hwm = _resident_high_water() if self.split else None
        return _host_peak() if hwm is None else hwm

    def whole_run(self) -> int:
        """The run's peak held on the device: reserved GPU memory, or on CPU the process's maximum resident set."""
        if torch.cuda.is_available():
            return max(self.load_device, self.train())
        return max(_host_peak(), self.train())  # the kernel's two counters can differ by a few pages

    def live(self) -> int | None:
        """Training's peak of live memory (bytes of tensors held at once), or None: not measured."""
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        return self.sampler.stop() if self.sampler is not None else None


def _innermost_optimizer(optimizer):
    """Follow the wrappers (Accelerate, DeepSpeed ZeRO, bf16) down to the torch optimizer that holds the state."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def per_rank(acc, model, optimizer, peaks: PhasePeaks) -> dict[str, list[int]]:
    """What each rank really holds, read from the engine (not assumed): parameter and optimizer-state elements,
    its peak memory held so far (ranks differ: rank 0 also evaluates and gathers), that peak by phase (host
    memory while loading; the device, on CPU host memory again, while training) and training's live peak."""
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    state = _innermost_optimizer(optimizer).state
    states = sum(v.numel() for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    live = peaks.live()
    row = [params, states, peaks.whole_run(), peaks.load_host, peaks.train(), -1 if live is None else live]
    counts = acc.gather(torch.tensor([row], device=acc.device)).tolist()
    return {"parameter_elements": [c[0] for c in counts], "optimizer_state_elements": [c[1] for c in counts],
            "peak_memory_bytes": [c[2] for c in counts], "load_host_peak_bytes": [c[3] for c in counts],
            "train_peak_bytes": [c[4] for c in counts],
            "live_peak_bytes": [None if c[5] < 0 else c[5] for c in counts]}


def memory_summary(ranks: dict[str, list], estimated: float | None) -> dict:
    """The largest rank's live peak beside the estimate of it (the preflight's "live at peak", bytes), and the
    peak held beside both: what to provision."""
    live = [b for b in ranks["live_peak_bytes"] if b is not None]
    return {"peak_memory_bytes": max(ranks["peak_memory_bytes"]), "live_peak_bytes": max(live) if live else None,
            "live_peak_estimated_bytes": None if estimated is None else int(estimated)}


def memory_line(summary: dict) -> str:
    """One log line: the live peak measured and estimated, under the estimate's name, and the peak held."""
    gib = lambda b: "not measured" if b is None else f"{b / 2**30:.3f} GiB"  # noqa: E731
    held = "reserved by torch's caching allocator" if torch.cuda.is_available() else \
        "resident set, with what the allocator keeps of freed blocks"
    return (f"memory, the largest rank: {LIVE} {gib(summary['live_peak_bytes'])} (estimated "
            f"{gib(summary['live_peak_estimated_bytes'])}); held at peak {gib(summary['peak_memory_bytes'])} "
            f"({held})")
