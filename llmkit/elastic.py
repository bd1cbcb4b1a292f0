"""Elastic resume: a checkpoint written by N ranks continued on M.

What a run consumes is defined without the number of ranks: optimizer step s trains on micro-batches
s*K .. s*K+K-1 of one global sequence (K = ranks x gradient accumulation; the length-grouped sampler groups
K batches, Accelerate deals batch i to rank i % ranks). Resuming on M ranks keeps K, and so the global batch,
by setting the accumulation to K / M; the run is refused when M does not divide K. The data position moves
with it: a rank's batches into the epoch are the global count over M.

ZeRO 1-3 shards the optimizer by rank, so the checkpoint is converted once with DeepSpeed's ds_to_universal
into `<checkpoint>/universal/` (its own manifest, verified and reused by later resumes) and loaded with
DeepSpeed's universal loading. ZeRO 0 and plain data parallelism hold whole states and load as they are.
Per-rank RNG streams (dropout) cannot carry over to another number of ranks: they are re-seeded from the seed,
the step and the rank, and the log says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from llmkit.errors import LlmkitError
from llmkit.rundir import MANIFEST, fsync_dir, verify_checkpoint, write_durably

UNIVERSAL = "universal"  # the converted copy, beside the checkpoint's own files
DS_TAG = "pytorch_model"  # the folder Accelerate's save_state gives the DeepSpeed engine


@dataclass
class Elastic:
    """How a checkpoint written by another number of ranks continues here."""
    saved_world: int
    world: int
    saved_accumulation: int
    accumulation: int
    zero_stage: int | None

    @property
    def universal(self) -> bool:
        """ZeRO 1-3: the optimizer is sharded by rank and loads through DeepSpeed's universal format."""
        return bool(self.zero_stage)

    def describe(self) -> str:
        micro = self.saved_world * self.saved_accumulation
        how = f"ZeRO-{self.zero_stage} shards converted once to DeepSpeed's universal format (reused if already " \
            "there)" if self.universal else "whole states (no ZeRO shards), loaded as they are"
        return (f"elastic resume: written by {self.saved_world} rank(s), continued on {self.world}; global batch "
                f"kept at {micro} micro-batches per step (gradient accumulation {self.saved_accumulation} -> "
                f"{self.accumulation}); {how}; per-rank RNG streams re-seeded")


def decide(cfg, checkpoint: Path, world: int) -> Elastic | None:
    """None when `checkpoint` was written by `world` ranks; else the plan, after setting
    cfg.train.gradient_accumulation_steps so the global batch stays what it was."""
    saved = json.loads((checkpoint / MANIFEST).read_text())["fingerprint"]
    if saved.get("world_size") in (None, world):
        return None
    t = cfg.train
    saved_world, saved_acc = int(saved["world_size"]), int(saved["gradient_accumulation_steps"])
    if cfg.data.streaming:
        raise LlmkitError(f"checkpoint {checkpoint} was written by {saved_world} ranks, each at its own place in its "
                          f"share of the stream; a streamed run resumes on {saved_world} ranks only")
    if t.per_device_batch_size != saved["per_device_batch_size"]:
        raise LlmkitError(f"checkpoint {checkpoint} was trained with train.per_device_batch_size "
                          f"{saved['per_device_batch_size']}; an elastic resume keeps it (and the global batch), so "
                          "set it back")
    micro = saved_world * saved_acc  # micro-batches per optimizer step: the global batch / per-device batch
    if micro % world:
        fits = [n for n in range(1, micro + 1) if micro % n == 0]
        raise LlmkitError(f"checkpoint {checkpoint} was written by {saved_world} ranks with gradient accumulation "
                          f"{saved_acc}: {micro} micro-batches of {t.per_device_batch_size} rows per optimizer step. "
                          f"{world} ranks cannot split that evenly, so the global batch could not be kept. Resume on "
                          f"{', '.join(map(str, fits))} rank(s), or start a new run from its export")
    accumulation = micro // world
    if t.gradient_accumulation_steps not in (saved_acc, accumulation):
        raise LlmkitError(f"train.gradient_accumulation_steps is {t.gradient_accumulation_steps}, but resuming "
                          f"checkpoint {checkpoint} ({saved_world} ranks x {saved_acc}) on {world} rank(s) keeps the "
                          f"global batch with {accumulation}: leave it at the checkpoint's value (llmkit adjusts it)")
    t.gradient_accumulation_steps = accumulation
    return Elastic(saved_world, world, saved_acc, accumulation, saved.get("zero_stage"))


def universal_of(checkpoint: Path, log) -> Path:
    """`<checkpoint>/universal/`: converted now (one process; the others must wait), or the verified copy a
    previous resume made. It holds DeepSpeed's universal folder and Accelerate's own extra states."""
    out = checkpoint / UNIVERSAL
    if (out / MANIFEST).is_file():
        verify_checkpoint(out)
        log(f"resume: reusing the universal checkpoint {out}")
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = checkpoint / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    began = time.perf_counter()
    said = io.StringIO()  # ds_to_universal prints every step; shown only if it fails
    try:
        with contextlib.redirect_stdout(said):
            # inject_missing_state: a plain transformers model carries no universal_checkpoint_info (DeepSpeed's
            # own tensor-parallel models set it); one worker each: no process pool inside a training rank
            ds_to_universal(SimpleNamespace(input_folder=str(checkpoint / DS_TAG), output_folder=str(tmp / DS_TAG),
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))
    except Exception as exc:  # DeepSpeed raises assertions, KeyErrors, ...: the checkpoint itself is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join(said.getvalue().strip().splitlines()[-3:])
        raise LlmkitError(f"converting checkpoint {checkpoint} to DeepSpeed's universal format failed "
                          f"({exc.__class__.__name__}: {exc}; ds_to_universal said: {tail}). The checkpoint is "
                          "unchanged: resume it on the number of ranks that wrote it") from None
    # Accelerate's own states beside the engine's (LR scheduler, samplers), not the per-rank RNG files
    for extra in checkpoint.iterdir():
        if extra.is_file() and extra.name.endswith((".pkl", ".bin")) and not extra.name.startswith("random_states"):
            shutil.copy2(extra, tmp / extra.name)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    digests = {rel: hashlib.sha256((tmp / rel).read_bytes()).hexdigest() for rel, size in files.items()
               if size <= 1 << 20}
    write_durably(tmp / MANIFEST, json.dumps({"converted_from": checkpoint.name, "files": files, "sha256": digests},
                                             indent=1))
    tmp.rename(out)
    fsync_dir(checkpoint)
    log(f"resume: converted {checkpoint} to DeepSpeed's universal format in {time.perf_counter() - began:.1f} s "
        f"({out})")
    return out


def universal_config(ds_config: dict) -> dict:
    """The DeepSpeed config that loads a universal checkpoint (set only for the run that resumes from one)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def reseed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank whose saved RNG stream cannot carry over: fixed by the run's seed, the step and the rank."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**32)
