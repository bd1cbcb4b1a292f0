"""Fault injection for the crash tests, off unless LLMKIT_FAULT is set (read once, at import).

LLMKIT_FAULT=<point>@<step>:<rank>: sigterm@5:1 (SIGTERM to rank 1 after step 5), kill@5:1 (SIGKILL between
forward and backward), kill_in_save@4:1 / oserror_in_save@4:1 (while checkpoint step-4 is written), nan@3:0
(the loss of step 3 becomes NaN), overflow@5:0 (from step 5 on, the loss times 1e30: finite in fp32, every fp16
gradient overflows; the loss-scale watchdog's test on a GPU), row@7:0 (reading training row 7 fails),
stall_export@0:0 (the export waits STALL_SECONDS, for a signal to arrive meanwhile), explain@0:0 (the
explanations' fresh process fails).
The numerics faults `llmkit check-numerics` must catch (llmkit.train.recording plants them; `*` is every rank):
drop_last_micro@2:* (from step 2 on, the last micro-batch of a step adds no gradient; its loss is still counted),
scale_grad@2:1 (from step 2 on, rank 1's gradient doubled), skip_partition@2:1 (ZeRO-3: rank 1's partition of every
parameter keeps its weights through step 2's update), lr_ahead@2:* (from step 2 on, the schedule one step ahead).
LLMKIT_FAULT_STAMP names a file that gets the time the fault fired. Callers test `ON` first, so a normal run
pays one attribute read per check.

LLMKIT_TRACE_ROWS=<folder>: each rank appends, per micro-batch, the optimizer step it belongs to and a checksum of
each row's real tokens to <folder>/rows_rank<r>.jsonl (the resume tests compare which rows each step trained on)."""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from pathlib import Path

SPEC = os.environ.get("LLMKIT_FAULT", "")
STALL_SECONDS = 3.0
ON = bool(SPEC)
POINT = SPEC.split("@", 1)[0]  # "" when off
TRACE = os.environ.get("LLMKIT_TRACE_ROWS", "")


def trace_rows(step: int, rank: int, batch: dict) -> None:
    """One line for this micro-batch: its step and each row's checksum (real tokens only)."""
    ids = batch["input_ids"].cpu().numpy()
    mask = batch["attention_mask"].cpu().numpy() if "attention_mask" in batch else ids * 0 + 1  # flattened rows
    rows = [zlib.crc32(row[m == 1].astype("int64").tobytes()) for row, m in zip(ids, mask)]
    with open(Path(TRACE) / f"rows_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "rows": rows}) + "\n")


def hit(point: str, step: int, rank: int) -> bool:
    """True when the fault `point` is due at this step on this rank; signals and OSErrors are raised here."""
    if SPEC != f"{point}@{step}:{rank}":
        return False
    if os.environ.get("LLMKIT_FAULT_STAMP"):  # when the fault fired, for the tests that time the aftermath
        Path(os.environ["LLMKIT_FAULT_STAMP"]).write_text(str(time.time()))
    if point in ("sigterm", "kill_in_save", "kill"):
        os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGKILL)
    if point == "oserror_in_save":
        raise OSError(28, "No space left on device (injected)")
    if point == "stall_export":
        time.sleep(STALL_SECONDS)
    return True


def from_step(point: str, step: int, rank: int) -> bool:
    """True at every step from the one `point` names on, on its rank (a fault that lasts, like overflow)."""
    if POINT != point:
        return False
    at, _, on = SPEC.split("@", 1)[1].partition(":")
    return step >= int(at) and (on == "*" or rank == int(on or 0))
