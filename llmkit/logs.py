"""What other libraries print in llmkit's processes. Left alone, each rank of a run repeats DeepSpeed's, torch's and
transformers' notices, and the launcher adds its own around a one-line user error. Here, each rank of a run
(`for_run`): rank 0 says each remaining warning once, the other ranks only errors; transformers' model load report
becomes one line of llmkit's (`load_report`). The launcher (`Held`) keeps torch's launcher lines until it knows
whether the run failed for a reason worth them. `LLMKIT_VERBOSE=1` leaves every library's output as it was."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSE = "LLMKIT_VERBOSE"


def verbose() -> bool:
    """LLMKIT_VERBOSE is set to anything but nothing, 0, false, no or off: no library's output is touched."""
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no", "off")


def main_rank() -> bool:
    """Global rank 0, or no launcher."""
    return os.environ.get("RANK", "0") == "0"


class Once(logging.Filter):
    """Errors always; anything else once per message on the main rank, and never on the others."""

    def __init__(self, main: bool) -> None:
        super().__init__()
        self.main, self.seen = main, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.levelno, record.getMessage())
        if not self.main or key in self.seen:
            return False
        self.seen.add(key)
        return True


def cpu_only() -> bool:
    """torch sees no accelerator (CUDA, XPU, MPS or a plugged-in device): DeepSpeed would settle on the CPU too."""
    import torch

    available = getattr(getattr(torch, "accelerator", None), "is_available", None)  # torch >= 2.6
    return not (available() if available is not None else torch.cuda.is_available())


def for_run() -> None:
    """Set once in each process of a run, before DeepSpeed is imported (the Accelerator imports it)."""
    # DeepSpeed logs through one logger, so a filter on it sees every record; set anew for this rank (and none when
    # verbose): an earlier run in the same interpreter may have left one
    deepspeed = logging.getLogger("DeepSpeed")
    for old in [f for f in deepspeed.filters if isinstance(f, Once)]:
        deepspeed.removeFilter(old)
    if verbose():
        return
    main = main_rank()
    if cpu_only():  # DeepSpeed then picks the CPU without warning that it found no GPU, once per process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.warnoptions:  # python -W or PYTHONWARNINGS: the user's own filters stand
        if main:  # appended: what Python hides by default (DeprecationWarning, ...) stays hidden
            warnings.simplefilter("once", append=True)
        else:
            warnings.simplefilter("ignore")
    deepspeed.addFilter(Once(main))
    import datasets
    import transformers

    # loading and writing a checkpoint's shards: rank 0 says what it loaded and wrote in its own lines
    transformers.utils.logging.disable_progress_bar()
    if not main:
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


@contextlib.contextmanager
def main_rank_stdout() -> Iterator[None]:
    """What libraries print() meanwhile reaches stdout from rank 0 only (DeepSpeed says on each rank that it built
    its CPU communication op)."""
    if verbose() or main_rank():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "log_state_dict_report"


@contextlib.contextmanager
def without_load_report() -> Iterator[None]:
    """transformers' load report (a table of the weights a checkpoint lacks, has over or has in another shape) is
    not logged meanwhile: `load_report` says it in one line."""
    logger = logging.getLogger("transformers.modeling_utils")  # the logger from_pretrained hands the report
    quiet = None if verbose() else _NoLoadReport()
    if quiet is not None:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        if quiet is not None:
            logger.removeFilter(quiet)


def _names(keys, most: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def load_report(info: dict) -> str | None:
    """from_pretrained's loading info (output_loading_info=True) in one line, or None when the checkpoint filled
    the model exactly."""
    missing, unused = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    said = []
    if missing:
        said.append(f"initialised fresh (not in the checkpoint): {_names(missing)}")
    if mismatched:
        said.append("initialised fresh (another shape in the checkpoint): " + _names(
            f"{key} {tuple(old)} -> {tuple(new)}" for key, old, new in mismatched))
    if unused:
        said.append(f"checkpoint weights this model does not use: {_names(unused)}")
    return "model: " + "; ".join(said) if said else None


class Held(logging.Handler):
    """Stands in for the handlers of the loggers named while the `with` lasts, keeping their records. On leaving:
    nothing of them after `drop()`; every record when an exception leaves the block; else the errors only."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(name) for name in names]
        self.saved: dict[logging.Logger, list[logging.Handler]] = {}
        self.dropped = False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def drop(self) -> None:
        self.dropped = True

    def __enter__(self) -> Held:
        if verbose():
            return self
        for logger in self.loggers:
            self.saved[logger] = list(logger.handlers)
            for handler in self.saved[logger]:
                logger.removeHandler(handler)
            logger.addHandler(self)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for logger, handlers in self.saved.items():
            logger.removeHandler(self)
            for handler in handlers:
                logger.addHandler(handler)
        if self.dropped:
            return
        least = logging.NOTSET if kind is not None else logging.ERROR
        for record in self.records:
            if record.levelno >= least:
                logging.getLogger(record.name).handle(record)
