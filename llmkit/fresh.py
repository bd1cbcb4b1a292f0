"""A fresh CPU-only Python process for work that must not run inside a training rank: reloading an export with
plain transformers (ship.verify) and explaining predictions (evals.explain). Inside a rank, transformers sees
the run's DeepSpeed config (a ZeRO-3 rank would load a model partitioned across ranks that are not taking part)
and the launcher's rank variables. Every path handed to such a process is absolute (absolute()): it does not run
in the user's working directory, and transformers takes a relative folder it cannot find for a Hub repo id."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def absolute(path: str | Path) -> Path:
    """`path` from the working directory, ~ expanded; symlinks are kept (the user's names stay in logs)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def end(code: int = 0) -> None:
    """Exit now, as the interpreter would, less its teardown: with torch, transformers and DeepSpeed loaded,
    freeing every module takes ~1.7 s (measured on 2 cores), paid by each rank, fresh process and command. What
    an exit must still do is done first: wait for non-daemon threads, run the atexit handlers (the run's lock,
    trackers, logging), flush the standard streams."""
    import atexit
    import threading

    # what the interpreter does first: the thread pools' exit hooks (concurrent.futures' workers, which
    # torch.compile starts, wait for them), then it joins the non-daemon threads
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_python(args: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` with no rank or Accelerate variables and no visible GPU, its output captured. It runs in
    `cwd` or an empty temporary folder: `-c` and `-m` put the working directory first on sys.path, and a
    json.py or torch.py lying in the user's folder must not be imported in place of the real one."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("ACCELERATE_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # the launcher gave each rank OMP_NUM_THREADS=1; the other ranks only wait meanwhile, so use every core
    env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if cwd is not None:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp)
