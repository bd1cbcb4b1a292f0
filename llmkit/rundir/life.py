"""A run folder's life: whether a run starts new, overwrites an earlier llmkit run or resumes one; the lock that
keeps a second run out.

A folder llmkit made carries a marker. Overwrite moves exactly llmkit's files of the earlier run into
`.previous/` (deleted once the new export is in place, so a failed new run leaves the old one recoverable), and
only in a folder llmkit made. The lock names the pid and host of the run holding it; the lock of a process that
is gone (same host) is taken over."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from pathlib import Path

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import RunDir, read_jsonl, write_durably


def is_run(run: RunDir) -> bool:
    """A folder an llmkit run made (or, from before the marker, one holding a run's records)."""
    return run.marker.is_file() or (run.run_info.is_file() and run.config.is_file())


def intent(cfg: Config, run: RunDir) -> str:
    """"new", "overwrite" or "resume" for the config's output dir (`run`: it, resolved by the preflight); a clear
    error when none applies."""
    out = run.root
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output.output_dir '{out}' exists and is not a directory")
    entries = [p for p in out.iterdir() if p != run.lock] if out.is_dir() else []
    if not entries or _never_trained(run, entries):
        return "new"
    if cfg.checkpoint.resume_from:
        return "resume"
    if cfg.output.overwrite_output_dir:
        if not is_run(run):
            names = ", ".join(sorted(p.name for p in entries)[:5])
            raise LlmkitError(f"output.output_dir '{out}' holds files llmkit did not write ({names}); "
                              "output.overwrite_output_dir replaces only an earlier llmkit run. Pick a new or empty "
                              "directory.")
        return "overwrite"
    raise LlmkitError(f"output.output_dir '{out}' already holds files from another run. Pick a new directory, "
                      "set output.overwrite_output_dir: true (the old run is kept in .previous/ until the new "
                      "export is complete), or continue it with --checkpoint.resume_from latest.")


def _never_trained(run: RunDir, entries: list[Path]) -> bool:
    """A folder an llmkit run made and left before its first step (a user error in the data, say): only the
    marker and TensorBoard's empty logs. Running the fixed command again must not be refused as "another run"."""
    return is_run(run) and set(entries) <= {run.marker, run.tensorboard}


def begin(run: RunDir, intent: str, log=print) -> None:
    """Rank 0, holding the lock: make the folder llmkit's; for an overwrite, move the earlier run aside."""
    run.root.mkdir(parents=True, exist_ok=True)
    if intent == "new" and _never_trained(run, [p for p in run.root.iterdir() if p != run.lock]):
        shutil.rmtree(run.tensorboard, ignore_errors=True)  # the stopped attempt's logs hold no step
    if intent == "overwrite":
        previous = run.previous
        shutil.rmtree(previous, ignore_errors=True)
        moved = run.owned()
        if moved:
            previous.mkdir()
            for path in moved:
                path.rename(previous / path.name)
            log(f"overwrite: the earlier run's {len(moved)} files and folders are in {previous} until this run's "
                "export is complete")
    write_durably(run.marker, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def drop_previous(run: RunDir) -> None:
    """The new export is in place: the overwritten run goes."""
    shutil.rmtree(run.previous, ignore_errors=True)


def trim_metrics(run: RunDir, step: int) -> int:
    """A resumed run logs again from `step` + 1: drop the rows after `step` (the stopped run's, or those of a
    later checkpoint's run). Returns how many rows went."""
    path = run.scalars
    if not path.is_file():
        return 0
    rows, torn = read_jsonl(path)
    keep = [row for row in rows if row.get("step", 0) <= step]
    if len(keep) != len(rows) or torn:
        write_durably(path, "".join(json.dumps(row) + "\n" for row in keep))
    return len(rows) - len(keep) + torn


# ------------------------------------------------------------------------------------------------- the lock


def _holder(run: RunDir) -> dict | None:
    """Who holds the lock: a live process here, or one on another host (which cannot be asked); None when the
    lock is free or its process is gone."""
    try:
        info = json.loads(run.lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant
        return {"pid": "?", "host": "?", "started": "just now"}
    if info.get("host") != socket.gethostname():
        return info
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, ValueError, KeyError):
        return info
    return info


def check_free(run: RunDir) -> None:
    """No other live run holds the folder."""
    held = _holder(run) if run.root.is_dir() else None
    if held is not None and held.get("pid") != os.getpid():
        raise LlmkitError(f"output.output_dir '{run.root}' is in use by another run (pid {held.get('pid')} on "
                          f"{held.get('host')}, started {held.get('started')}). Wait for it to finish or pick another "
                          f"output.output_dir; if that process is gone, delete {run.lock}.")


class Lock:
    """The run's exclusive hold on its output dir: taken by rank 0 before anything is written, released at exit."""

    def __init__(self, run: RunDir):
        self.path = run.lock
        run.root.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_free(run)  # a live holder: refused
                self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            atexit.register(self.release)
            return
        check_free(run)
        raise LlmkitError(f"could not take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
