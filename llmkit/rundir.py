"""The run directory's life, in one place: whether a run starts new, overwrites an earlier llmkit run or resumes
one; the lock that keeps a second run out; which files are llmkit's; and the durable writes records are made with.

A folder llmkit made carries `.llmkit-run`. Overwrite moves exactly llmkit's files of the earlier run into
`.previous/` (deleted once the new export is in place, so a failed new run leaves the old one recoverable), and
only in a folder llmkit made. The lock `.llmkit.lock` names the pid and host of the run holding it; the lock of a
process that is gone (same host) is taken over."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from llmkit.config import Config
from llmkit.errors import LlmkitError

MARKER = ".llmkit-run"
LOCK = ".llmkit.lock"
PREVIOUS = ".previous"
MANIFEST = "manifest.json"  # inside a checkpoint: its files, sizes, digests; written last
DIGEST_UP_TO = 1 << 20  # checkpoint files up to 1 MiB (states, RNG, scheduler) get a sha256: same-size damage shows
# what a run writes into its output dir (predictions_<split>.jsonl and .hub-* staging folders by pattern)
OWNED = ("checkpoints", "final", "final.tmp", "final.old", "runs", "wandb", "profile", "tokenizer", "hub_upload",
         ".hub-snapshots", "metrics.json", "metrics.jsonl", "samples.jsonl", "training_config.yaml",
         "run_info.json", "ds_config.json", "explanations.json", "report.html", "report.md", "report.json",
         ".llmkit-dry-runs.json")
OWNED_PATTERNS = ("predictions_*.jsonl", ".hub-*")


def is_run(folder: Path) -> bool:
    """A folder an llmkit run made (or, from before the marker, one holding a run's records)."""
    return (folder / MARKER).is_file() or ((folder / "run_info.json").is_file()
                                           and (folder / "training_config.yaml").is_file())


def owned(folder: Path) -> list[Path]:
    """The entries of `folder` that an llmkit run writes."""
    found = {folder / name for name in OWNED if (folder / name).exists() or (folder / name).is_symlink()}
    for pattern in OWNED_PATTERNS:
        found.update(folder.glob(pattern))
    return sorted(found)


def intent(cfg: Config) -> str:
    """"new", "overwrite" or "resume" for the config's output dir; a clear error when none applies."""
    out = Path(cfg.output.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output.output_dir '{out}' exists and is not a directory")
    entries = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if not entries or _never_trained(out, entries):
        return "new"
    if cfg.checkpoint.resume_from:
        return "resume"
    if cfg.output.overwrite_output_dir:
        if not is_run(out):
            names = ", ".join(sorted(p.name for p in entries)[:5])
            raise LlmkitError(f"output.output_dir '{out}' holds files llmkit did not write ({names}); "
                              "output.overwrite_output_dir replaces only an earlier llmkit run. Pick a new or empty "
                              "directory.")
        return "overwrite"
    raise LlmkitError(f"output.output_dir '{out}' already holds files from another run. Pick a new directory, "
                      "set output.overwrite_output_dir: true (the old run is kept in .previous/ until the new "
                      "export is complete), or continue it with --checkpoint.resume_from latest.")


def _never_trained(out: Path, entries: list[Path]) -> bool:
    """A folder an llmkit run made and left before its first step (a user error in the data, say): only the
    marker and TensorBoard's empty logs. Running the fixed command again must not be refused as "another run"."""
    return is_run(out) and {p.name for p in entries} <= {MARKER, "runs"}


def begin(out: Path, how: str, log=print) -> None:
    """Rank 0, holding the lock: make the folder llmkit's; for an overwrite, move the earlier run aside."""
    out.mkdir(parents=True, exist_ok=True)
    if how == "new" and _never_trained(out, [p for p in out.iterdir() if p.name != LOCK]):
        shutil.rmtree(out / "runs", ignore_errors=True)  # the stopped attempt's logs hold no step
    if how == "overwrite":
        previous = out / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        moved = owned(out)
        if moved:
            previous.mkdir()
            for path in moved:
                path.rename(previous / path.name)
            log(f"overwrite: the earlier run's {len(moved)} files and folders are in {previous} until this run's "
                "export is complete")
    write_durably(out / MARKER, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def drop_previous(out: Path) -> None:
    """The new export is in place: the overwritten run goes."""
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The rows of a run's line file (metrics.jsonl, predictions_*.jsonl, samples.jsonl) and how many torn last
    lines were skipped (0 or 1): a run killed mid-write, or a power loss, leaves its last line cut. A bad line
    before the last is damage, not a torn write, and is an error naming the file and line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return rows, 1
            raise LlmkitError(f"{path} line {i + 1} is not JSON (damaged); restore the file or delete that line") \
                from None
    return rows, 0


def trim_metrics(out: Path, step: int) -> int:
    """A resumed run logs again from `step` + 1: drop the rows after `step` (the stopped run's, or those of a
    later checkpoint's run). Returns how many rows went."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows, torn = read_jsonl(path)
    keep = [row for row in rows if row.get("step", 0) <= step]
    if len(keep) != len(rows) or torn:
        write_durably(path, "".join(json.dumps(row) + "\n" for row in keep))
    return len(rows) - len(keep) + torn


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` so that it counts only once it is on disk: a temporary file, fsync, rename, and an
    fsync of the folder (a crash leaves the old file or the new one, never a torn one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------- the lock


def _holder(folder: Path) -> dict | None:
    """Who holds the lock: a live process here, or one on another host (which cannot be asked); None when the
    lock is free or its process is gone."""
    try:
        info = json.loads((folder / LOCK).read_text())
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


def check_free(out: Path) -> None:
    """No other live run holds `out`."""
    held = _holder(out) if out.is_dir() else None
    if held is not None and held.get("pid") != os.getpid():
        raise LlmkitError(f"output.output_dir '{out}' is in use by another run (pid {held.get('pid')} on "
                          f"{held.get('host')}, started {held.get('started')}). Wait for it to finish or pick another "
                          f"output.output_dir; if that process is gone, delete {out / LOCK}.")


class Lock:
    """The run's exclusive hold on its output dir: taken by rank 0 before anything is written, released at exit."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        out.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_free(out)  # a live holder: refused
                self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            atexit.register(self.release)
            return
        check_free(out)
        raise LlmkitError(f"could not take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------ checkpoints on disk


def checkpoint_steps(root: Path) -> list[Path]:
    """The checkpoint folders step-<n> under `root`, oldest first (a user's step-2.bak is not one)."""
    found = [p for p in root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_manifest(folder: Path, **facts) -> None:
    """Flush every file of the checkpoint `folder` to disk, then write its manifest (sizes, small files' sha256,
    `facts`) last and durably: a checkpoint counts only once every file it names is on disk."""
    files, digests = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        files[rel] = path.stat().st_size
        if files[rel] <= DIGEST_UP_TO:
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_durably(folder / MANIFEST, json.dumps({**facts, "files": files, "sha256": digests}, indent=1))


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, untruncated checkpoint; a clear error otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise LlmkitError(f"checkpoint {path} is incomplete (no {MANIFEST}): it was being written when the run "
                          "stopped. Resume from an earlier one (see the checkpoints folder) or from `latest`.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, digests = dict(manifest["files"]), dict(manifest.get("sha256") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise LlmkitError(f"checkpoint {path} is damaged: its {MANIFEST} does not parse ({exc.__class__.__name__}). "
                          "Resume from another checkpoint.") from None
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            raise LlmkitError(f"checkpoint {path} is damaged: {rel} is missing")
        if file.stat().st_size != size:
            raise LlmkitError(f"checkpoint {path} is damaged: {rel} has {file.stat().st_size} bytes, the manifest "
                              f"says {size} (truncated or overwritten). Resume from another checkpoint.")
        if rel in digests and hashlib.sha256(file.read_bytes()).hexdigest() != digests[rel]:
            raise LlmkitError(f"checkpoint {path} is damaged: {rel} does not match the sha256 in its manifest "
                              "(changed after it was written). Resume from another checkpoint.")
    return manifest


OPTIMIZER_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler",
                  "warmup_ratio", "max_grad_norm")


def fingerprint(cfg: Config, world_size: int, zero_stage: int | None, precision: str,
                data_identity: dict | None = None) -> dict:
    """What a resumed run must share with the checkpoint for the continuation to be the same training run: the
    model, the data's content and labels (known once the data is tokenized; until then its source), how the work
    is split and computed, and the optimizer's hyperparameters (the saved optimizer and LR schedule continue)."""
    t = cfg.train
    return {
        "model": cfg.model.name_or_path, "data": data_identity or {"dataset": cfg.data.dataset or cfg.data.data_files},
        "world_size": world_size, "zero_stage": zero_stage, "precision": precision,
        "per_device_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "seed": t.seed,
        "group_by_length": cfg.data.group_by_length, "max_length": cfg.data.max_length,
        "optimizer": {key: getattr(t, key) for key in OPTIMIZER_KEYS},
    }


def refuse_other_run(path: Path, recorded: dict, want: dict, elastic: bool = False) -> None:
    """A clear error when this launch (`want`, a fingerprint) is not the run checkpoint `path` recorded. Preflight
    asks before any process group without "data" (the rows are not read yet); the resume asks again with it.
    `elastic`: another split of the global batch was agreed (llmkit.elastic.decide)."""
    unrecorded = [k for k in want if k not in recorded]
    if unrecorded:
        raise LlmkitError(f"checkpoint {path} was written by an older llmkit: its manifest does not record "
                          f"{', '.join(unrecorded)}, which a resume must match. Finish that run with the llmkit that "
                          "wrote it, or start a new run from its export.")
    diff = {k: (recorded.get(k), v) for k, v in want.items() if recorded.get(k) != v}
    if elastic:
        diff.pop("world_size", None)
        diff.pop("gradient_accumulation_steps", None)
    if "optimizer" in diff and len(diff) == 1:
        old, new = (d or {} for d in diff["optimizer"])
        changed = ", ".join(f"train.{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in OPTIMIZER_KEYS
                            if old.get(k) != new.get(k))
        raise LlmkitError(f"checkpoint {path} was trained with other optimizer settings ({changed}). Resuming "
                          "restores the saved optimizer and LR schedule, so the new values would not take effect: "
                          "resume with the checkpoint's values, or start a new run from its export (final/).")
    if "data" in diff:
        old, new = diff.pop("data")
        what = [k for k in sorted({*(old or {}), *(new or {})}) if (old or {}).get(k) != (new or {}).get(k)]
        raise LlmkitError(f"checkpoint {path} was trained on other data ({', '.join(what)} changed): a resumed "
                          "run must see the same rows and labels, in the same order. Resume with the data it was "
                          "trained on, or start a new output_dir.")
    if diff:
        lines = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in diff.items())
        raise LlmkitError(f"checkpoint {path} belongs to a different run ({lines}). Resume with the same settings, "
                          "or start a new output_dir.")


def resolve_checkpoint(output_dir: Path, resume_from: str) -> Path:
    """`latest` or a path -> a verified checkpoint folder; with `latest`, falls back to the newest good one."""
    root = output_dir / "checkpoints"
    if resume_from != "latest":
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise LlmkitError(f"checkpoint.resume_from: '{resume_from}' is not a checkpoint folder")
        if checkpoint_steps(path) and not (path / MANIFEST).is_file():
            raise LlmkitError(f"checkpoint.resume_from: '{resume_from}' is the folder holding the checkpoints; name "
                              f"one step-<n> inside it ({checkpoint_steps(path)[-1]} is the newest) or use 'latest'")
        verify_checkpoint(path)
        return path
    pointer = root / "latest"
    candidates = checkpoint_steps(root)[::-1]
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except LlmkitError as exc:
            problems.append(str(exc))
    detail = ("; ".join(problems)) if problems else "none was written"
    raise LlmkitError(f"checkpoint.resume_from is 'latest' but {root} holds no usable checkpoint ({detail})")
