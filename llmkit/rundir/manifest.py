"""A checkpoint's manifest: every file it holds with its size (and a sha256 of the small ones), written last
and durably, so a checkpoint counts only once all it names is on disk, and a truncated, missing or changed file
is found before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.rundir.layout import write_durably

MANIFEST = "manifest.json"  # inside a checkpoint (and its universal copy); written last
DIGEST_UP_TO = 1 << 20  # checkpoint files up to 1 MiB (states, RNG, scheduler) get a sha256: same-size damage shows


def write(folder: Path, **facts) -> None:
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


def verify(path: Path) -> dict:
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
