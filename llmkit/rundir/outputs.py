"""The folder a command writes (`llmkit eval`, `compare`, `report --output`, `push --dry-run`), under the training
run's rule: a new or empty folder, or, with --overwrite, an earlier output of the same command, replaced whole.

The new output is built in a hidden sibling folder and swapped in once complete, so a failure (or an interrupt)
leaves the earlier output as it was and never half old, half new. A folder the command did not write (a training
run's, one holding the user's files) is never replaced, --overwrite or not."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.rundir import life
from llmkit.rundir.layout import METRICS, PREDICTIONS, RunDir

REPORT_MARKER = ".llmkit-report"  # a `llmkit report --output` folder, not a run's
_NAMES = RunDir(Path())  # for the names of its files only
REPORTS = tuple(path.name for path in _NAMES.reports().values())
# every entry each command's folder holds (glob patterns): anything else there is the user's, never replaced
EVAL_WRITES = (PREDICTIONS.format(split="*"), METRICS, _NAMES.run_info.name, *REPORTS, _NAMES.eval_marker.name)
REPORT_WRITES = (*REPORTS, REPORT_MARKER)


def check(out: Path, command: str, ours: bool, names: tuple[str, ...], overwrite: bool, flag: str = "--output") -> None:
    """Refuse `out` unless it is new or empty, or (`overwrite`) an earlier output of `command`: `ours` (its marker
    or record says so) and holding nothing but the files `command` writes (`names`: their glob patterns)."""
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"{flag} {out} is a file, not a folder; pick a new folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if life.is_run(RunDir(out)):
        raise LlmkitError(f"{flag} {out} is a training run's folder, which `{command}` never replaces (--overwrite "
                          "or not); pick a new folder")
    foreign = [n for n in entries if not any(fnmatch(n, pattern) for pattern in names)]
    if not ours or foreign:
        raise LlmkitError(f"{flag} {out} holds files `{command}` did not write ({', '.join((foreign or entries)[:3])})"
                          f"; pick a new or empty folder (--overwrite replaces only an earlier `{command}` output)")
    if not overwrite:
        raise LlmkitError(f"{flag} {out} holds an earlier `{command}` output; add --overwrite to replace it whole, or "
                          "pick a new folder")


@contextmanager
def replaced(out: Path) -> Iterator[Path]:
    """The folder to build the output in, named as `out` (a report names a run by its folder); when the block ends
    it becomes `out`, and only then does the earlier `out` go. A failure removes it and leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.llmkit-", dir=out.parent))
    build, earlier = work / out.name, work / f"{out.name}.earlier"
    try:
        build.mkdir()
        yield build
        if out.exists() or out.is_symlink():
            os.rename(out, earlier)
        os.rename(build, out)
    except BaseException as exc:
        if earlier.exists() and not out.exists():  # the swap itself failed: the earlier output goes back
            os.rename(earlier, out)
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, LlmkitError) and str(build) in str(exc):  # the user knows the folder by its own name
            raise LlmkitError(str(exc).replace(str(build), str(out)), exc.on_every_rank) from None
        raise
    shutil.rmtree(work, ignore_errors=True)
