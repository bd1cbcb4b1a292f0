"""Fault injection for the crash tests, off unless LLMKIT_FAULT is set (read once, at import).

LLMKIT_FAULT=<point>@<step>:<rank>: sigterm@5:1 (SIGTERM to rank 1 after step 5), kill@5:1 (SIGKILL between
forward and backward), kill_in_save@4:1 / oserror_in_save@4:1 (while checkpoint step-4 is written), nan@3:0
(the loss of step 3 becomes NaN), row@7:0 (reading training row 7 fails), stall_export@0:0 (the export waits
STALL_SECONDS, for a signal to arrive meanwhile). LLMKIT_FAULT_STAMP names a file that gets the time the fault
fired. Callers test `ON` first, so a normal run pays one attribute read per check."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SPEC = os.environ.get("LLMKIT_FAULT", "")
STALL_SECONDS = 3.0
ON = bool(SPEC)
POINT = SPEC.split("@", 1)[0]  # "" when off


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
