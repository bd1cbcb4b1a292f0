"""How every entry point (the `llmkit` console command and the recipes) ends: a user error (LlmkitError) as one
`llmkit: error:` line and exit 2, said once across the ranks; anything else keeps its traceback. Light on purpose:
the command line imports it before it knows which command runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable

from llmkit import fresh
from llmkit.errors import USER_ERROR, LlmkitError


def is_main_rank() -> bool:
    """True on global rank 0 (or outside a launcher), so errors print once."""
    return os.environ.get("RANK", "0") == "0"


def _tell_launcher(line: str) -> None:
    """Under torch elastic (`accelerate launch` with several processes) write the error file the launcher reads
    for its failure summary: its "Root Cause" then shows this line (not "To enable traceback see ..."), in the
    plain-message form torch's ProcessFailure reads."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": line, "timestamp": int(time.time())}, fh)
    except OSError:
        pass  # the summary then says less; the line itself is already on stderr


def guarded(fn: Callable[[], object], end: bool = False) -> None:
    """Run `fn`; print an LlmkitError as one clear line (no traceback) and exit 2. `end`: this is the whole
    process (a recipe, the console command), so it ends without the interpreter's slow teardown (fresh.end)."""
    try:
        fn()
        if end:
            fresh.end(0)
    except LlmkitError as exc:
        line = f"llmkit: error: {exc}"
        if is_main_rank():
            _tell_launcher(line)
            print(line, file=sys.stderr, flush=True)
        elif "LOCAL_RANK" in os.environ:
            # most errors are raised by every rank together: rank 0 prints and exits first, and the launcher
            # stops the others during this wait (with SIGTERM, which the run's own handler must no longer catch).
            # Still alive afterwards means the error is this rank's alone: say it, unless rank 0 sent it here.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(5)
            if not exc.on_every_rank:
                _tell_launcher(line)
                print(f"llmkit: error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr, flush=True)
        _leave_process_group()
        if end:
            fresh.end(USER_ERROR)
        sys.exit(USER_ERROR)


def _leave_process_group() -> None:
    """A rank stopping on a user error leaves the process group now: in interpreter teardown, gloo's destructor
    on rank 0 (the store's host) was seen to wait ~55 s for the other ranks."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def recipe_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """`--config FILE` plus `--section.key value` overrides, as the recipes take them."""
    parser = argparse.ArgumentParser(description="llmkit recipe: --config FILE [--section.key VALUE ...]")
    parser.add_argument("--config", help="YAML recipe config")
    args, rest = parser.parse_known_args(argv)
    return args.config, rest
