"""Elastic resume: a checkpoint written by N ranks continued on M (or with a new global batch, when asked).

What a run consumes is defined without the number of ranks: optimizer step s trains on micro-batches
s*K .. s*K+K-1 of one global sequence (K = ranks x gradient accumulation; the length-grouped sampler groups
K batches, Accelerate deals batch i to rank i % ranks). Resuming on M ranks keeps K, and so the global batch,
by setting the accumulation to K / M; the run is refused when M does not divide K, unless
checkpoint.new_global_batch takes this launch's accumulation instead: the samples keep the checkpoint's order
(length groups of K), only the number a step takes changes. The data position moves with it: a rank's batches
into the epoch are the global count over M (rounded up with a new global batch: up to M-1 batches of that epoch
are skipped, and the log says how many).

ZeRO 1-3 shards the optimizer by rank, so the checkpoint is converted once with DeepSpeed's ds_to_universal
into `<checkpoint>/universal/` (its own manifest, verified and reused by later resumes) and loaded with
DeepSpeed's universal loading. ZeRO 0 and plain data parallelism hold whole states and load as they are.
Per-rank RNG streams (dropout) cannot carry over to another number of ranks: they are re-seeded from the seed,
the step and the rank, and the log says so.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from llmkit.errors import LlmkitError
from llmkit.rundir import manifest
from llmkit.rundir.layout import fsync_dir

UNIVERSAL = "universal"  # the converted copy, beside the checkpoint's own files
DS_TAG = "pytorch_model"  # the folder Accelerate's save_state gives the DeepSpeed engine


@dataclass
class Elastic:
    """How a checkpoint continues under another split of its global batch, or with a new global batch."""
    saved_world: int
    world: int
    saved_accumulation: int
    accumulation: int
    zero_stage: int | None
    per_device_batch_size: int

    @property
    def saved_micro(self) -> int:
        """Micro-batches per optimizer step in the checkpoint's run (its global batch / per-device batch)."""
        return self.saved_world * self.saved_accumulation

    @property
    def micro(self) -> int:
        return self.world * self.accumulation

    @property
    def new_global_batch(self) -> bool:
        return self.micro != self.saved_micro

    @property
    def universal(self) -> bool:
        """ZeRO 1-3 on another number of ranks: the optimizer is sharded by rank and loads through DeepSpeed's
        universal format."""
        return bool(self.zero_stage) and self.world != self.saved_world

    def record(self) -> dict:
        """What metrics.json keeps of the decision."""
        rows = self.per_device_batch_size
        return {"saved_world": self.saved_world, "world": self.world, "saved_accumulation": self.saved_accumulation,
                "accumulation": self.accumulation, "zero_stage": self.zero_stage, "universal": self.universal,
                "saved_global_batch": self.saved_micro * rows, "global_batch": self.micro * rows,
                "new_global_batch": self.new_global_batch}

    def describe(self) -> str:
        rows = self.per_device_batch_size
        if self.new_global_batch:
            batch = (f"NEW global batch (checkpoint.new_global_batch): {self.saved_micro * rows} -> "
                     f"{self.micro * rows} rows per step ({self.saved_world} rank(s) x accumulation "
                     f"{self.saved_accumulation} -> {self.world} x {self.accumulation}); the checkpoint's order of "
                     "samples continues, steps take more or fewer of them")
        else:
            batch = (f"global batch kept at {self.saved_micro} micro-batches per step (gradient accumulation "
                     f"{self.saved_accumulation} -> {self.accumulation})")
        if self.world == self.saved_world:
            return f"resume with a new global batch on the {self.world} rank(s) that wrote it: {batch}"
        how = f"ZeRO-{self.zero_stage} shards converted once to DeepSpeed's universal format (reused if already " \
            "there)" if self.universal else "whole states (no ZeRO shards), loaded as they are"
        return (f"elastic resume: written by {self.saved_world} rank(s), continued on {self.world}; {batch}; {how}; "
                "per-rank RNG streams re-seeded")


def decide(cfg, checkpoint: Path, saved: dict, world: int) -> Elastic | None:
    """None when `checkpoint` continues as it was written (same ranks, same accumulation); else the plan, whose
    accumulation keeps the global batch what it was (unless checkpoint.new_global_batch says to take this
    launch's): the run trains with it, the config stays as given. `saved`: the fingerprint its manifest
    recorded."""
    if saved.get("world_size") is None:  # an older manifest: checkpoint.load names what it lacks
        return None
    t, new_batch = cfg.train, cfg.checkpoint.new_global_batch
    saved_world, saved_acc = int(saved["world_size"]), int(saved["gradient_accumulation_steps"])
    if saved_world == world and t.gradient_accumulation_steps == saved_acc:
        return None
    rows = t.per_device_batch_size
    micro = saved_world * saved_acc  # micro-batches per optimizer step: the global batch / per-device batch
    opt_in = (f"or continue with a global batch of {world * t.gradient_accumulation_steps * rows} rows "
              f"({world} rank(s) x accumulation {t.gradient_accumulation_steps} x {rows}) with "
              "--checkpoint.new_global_batch true")
    if rows != saved["per_device_batch_size"]:
        raise LlmkitError(f"checkpoint {checkpoint} was trained with train.per_device_batch_size "
                          f"{saved['per_device_batch_size']}; a resume keeps its batches of rows (the data position "
                          "counts them), so set it back; change train.gradient_accumulation_steps (with "
                          "--checkpoint.new_global_batch true) to change the global batch")
    if cfg.data.streaming and saved_world != world:
        raise LlmkitError(f"checkpoint {checkpoint} was written by {saved_world} ranks, each at its own place in its "
                          f"share of the stream; a streamed run resumes on {saved_world} ranks only")
    if new_batch:
        accumulation = t.gradient_accumulation_steps
    elif saved_world == world:
        raise LlmkitError(f"train.gradient_accumulation_steps is {t.gradient_accumulation_steps}, but checkpoint "
                          f"{checkpoint} was trained with {saved_acc}: a resume keeps the global batch. Set it back, "
                          + opt_in)
    elif micro % world:
        fits = [n for n in range(1, micro + 1) if micro % n == 0]
        raise LlmkitError(f"checkpoint {checkpoint} was written by {saved_world} ranks with gradient accumulation "
                          f"{saved_acc}: {micro} micro-batches of {rows} rows per optimizer step. {world} ranks cannot "
                          f"split that evenly, so the global batch could not be kept. Resume on "
                          f"{', '.join(map(str, fits))} rank(s), " + opt_in)
    else:
        accumulation = micro // world
        if t.gradient_accumulation_steps not in (saved_acc, accumulation):
            raise LlmkitError(f"train.gradient_accumulation_steps is {t.gradient_accumulation_steps}, but resuming "
                              f"checkpoint {checkpoint} ({saved_world} ranks x {saved_acc}) on {world} rank(s) keeps "
                              f"the global batch with {accumulation}: leave it at the checkpoint's value (llmkit "
                              "adjusts it), " + opt_in)
    return Elastic(saved_world, world, saved_acc, accumulation, saved.get("zero_stage"), rows)


def universal_of(checkpoint: Path, log) -> Path:
    """`<checkpoint>/universal/`: converted now (one process; the others must wait), or the verified copy a
    previous resume made. It holds DeepSpeed's universal folder and Accelerate's own extra states."""
    out = checkpoint / UNIVERSAL
    if (out / manifest.MANIFEST).is_file():
        manifest.verify(out)
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
    manifest.write(tmp, converted_from=checkpoint.name)
    tmp.rename(out)
    fsync_dir(checkpoint)
    log(f"resume: converted {checkpoint} to DeepSpeed's universal format in {time.perf_counter() - began:.1f} s "
        f"({out})")
    return out


def universal_bytes(checkpoint: Path) -> int:
    """Disk the universal copy will take (0 once it exists): every parameter's fp32 weight and Adam moments in
    files of their own, plus the engine's model states copied. It came to 1.5x the optimizer shards for SmolLM2
    under ZeRO-3 (bench/elastic.py); counted at 2x to leave room."""
    if (checkpoint / UNIVERSAL / manifest.MANIFEST).is_file():
        return 0
    engine = checkpoint / DS_TAG
    shards = sum(p.stat().st_size for p in engine.glob("*optim_states.pt"))
    states = next((p.stat().st_size for p in sorted(engine.glob("*model_states.pt"))), 0)
    return 2 * shards + states


def universal_config(ds_config: dict) -> dict:
    """The DeepSpeed config that loads a universal checkpoint (set only for the run that resumes from one)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def reseed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank whose saved RNG stream cannot carry over: fixed by the run's seed, the step and the rank."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**32)
