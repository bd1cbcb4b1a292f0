"""Crash-safe checkpoints and exact resume.

A checkpoint is `<output_dir>/checkpoints/step-<n>/`: Accelerate's `save_state` (model, optimizer and, under
DeepSpeed, the engine's ZeRO shards), the LR scheduler, each rank's RNG states, and `trainer_state.json`
(global step, data position, sampler seed, best metric). It is written under a temporary name and renamed
into place by rank 0 only after every rank has finished; `manifest.json` (files and sizes, and what the
run must match to resume) is written last inside it, and the `latest` pointer moves after the rename.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit import elastic, faults, rundir
from llmkit.errors import LlmkitError
from llmkit.rundir import MANIFEST, checkpoint_steps, fsync_dir, verify_checkpoint, write_durably, write_manifest

STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: enough to continue from the exact next batch."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # batches of `epoch` already consumed by this rank
    sampler_seed: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def fingerprint(run) -> dict:
    """This run's fingerprint (rundir.fingerprint), with the data it trains on (`run.data_identity`)."""
    return rundir.fingerprint(run.cfg, run.accelerator.num_processes, run.zero_stage, run.precision,
                              getattr(run, "data_identity", None))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore the python, numpy and torch RNGs saved with a checkpoint."""
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(run, trainer_state: TrainerState, keep_last: int | None, keep_best: int, rank_state: dict | None = None
         ) -> Path:
    """Write checkpoint step-<n> atomically (all ranks must call this) and prune old ones; `rank_state`: more of
    this rank's own state (a stream's position), kept beside its RNG states."""
    acc = run.accelerator
    root = run.output_dir / "checkpoints"
    final = root / f"step-{trainer_state.step}"
    tmp = root / f".tmp-step-{trainer_state.step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    failure = None
    try:
        acc.save_state(str(tmp))
        (tmp / f"rng_rank{acc.process_index}.json").write_text(json.dumps({**_rng_state(), **(rank_state or {})}))
        if faults.ON:  # the crash tests: a rank killed, or the disk full, while the checkpoint is written
            faults.hit("kill_in_save", trainer_state.step, acc.process_index)
            faults.hit("oserror_in_save", trainer_state.step, acc.process_index)
    except OSError as exc:  # disk full, quota, I/O error: no rank may go on as if the checkpoint existed
        failure = exc
    failed = acc.reduce(torch.tensor(int(failure is not None), device=acc.device), reduction="sum").item()
    if failed:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = resolve_latest(root)
        raise LlmkitError(f"writing checkpoint step-{trainer_state.step} failed on {failed} rank(s)"
                          + (f" ({failure.__class__.__name__}: {failure})" if failure else "")
                          + f"; nothing was replaced: the previous checkpoint ({previous or 'none yet'}) and export "
                          "are intact. Free disk space, then continue with --checkpoint.resume_from latest.")
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(asdict(trainer_state), indent=1))
        write_manifest(tmp, step=trainer_state.step, fingerprint=fingerprint(run))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        write_durably(root / "latest", final.name + "\n")
        _prune(root, keep_last, keep_best, trainer_state)
    acc.wait_for_everyone()
    return final


def resolve_latest(root: Path) -> str | None:
    """The name `latest` points at, if any (for messages)."""
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def _prune(root: Path, keep_last: int | None, keep_best: int, state: TrainerState) -> None:
    done = [p for p in checkpoint_steps(root) if (p / MANIFEST).is_file()]
    keep = set(done[-keep_last:]) if keep_last else set(done)
    if keep_best and state.history:
        scored = [h for h in state.history if h.get("checkpoint") and h.get("score") is not None]
        scored.sort(key=lambda h: h["score"], reverse=True)
        keep |= {root / h["checkpoint"] for h in scored[:keep_best]}
    for path in done:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _safe_globals() -> list:
    """The only non-tensor types a llmkit checkpoint may hold: DeepSpeed's stage enum, loss scaler and fragment
    addresses (plain attribute bags), and numpy arrays / dtypes (Accelerate's RNG states)."""
    import numpy.dtypes
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, core.multiarray._reconstruct, np.ndarray,
            np.dtype, *dtypes]


def check_pickles(path: Path) -> None:
    """DeepSpeed and Accelerate unpickle their checkpoint files with weights_only=False (a pickle can run
    code). Each file must first load with weights_only=True and the allowlist above, or it is refused."""
    allowed = _safe_globals()
    for file in sorted(path.rglob("*")):
        if file.suffix not in (".pt", ".pkl", ".bin", ".pth"):
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            unsafe = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), None)
            if unsafe is None:  # not a forbidden type: the file itself is broken
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise LlmkitError(f"checkpoint {path} is damaged: {file.relative_to(path)} cannot be read "
                                  f"({exc.__class__.__name__}: {first}). Resume from another checkpoint.") from None
            raise LlmkitError(f"checkpoint file {file.relative_to(path)} holds more than tensors and plain data "
                              f"({unsafe}); llmkit does not load it, as unpickling it could run code. Resume only "
                              "from checkpoints llmkit wrote.") from None


def load(run, path: Path, optimizer) -> tuple[TrainerState, dict]:
    """Restore what `path` holds into the prepared objects; return the trainer state and this rank's RNG state.

    The caller restores the RNG state itself, once the data iterator has started: starting one draws from
    torch's RNG, and the uninterrupted run drew that number before the checkpoint, not after."""
    acc = run.accelerator
    manifest = verify_checkpoint(path)
    rundir.refuse_other_run(path, manifest["fingerprint"], fingerprint(run), elastic=run.elastic is not None)
    check_pickles(path)
    state = TrainerState(**json.loads((path / STATE).read_text()))
    if run.elastic is None:
        acc.load_state(str(path))
        return state, json.loads((path / f"rng_rank{acc.process_index}.json").read_text())
    return state, _load_elsewhere(run, path, state, optimizer)


def _load_elsewhere(run, path: Path, state: TrainerState, optimizer) -> dict:
    """Load a checkpoint written by another number of ranks, or for a new global batch (llmkit.elastic);
    returns this rank's RNG state."""
    acc, plan = run.accelerator, run.elastic
    source = path
    if plan.universal:
        run.main_first(lambda: elastic.universal_of(path, run.log), others=False)
        source = path / elastic.UNIVERSAL
        check_pickles(source)
    # DeepSpeed's ZeRO-3 universal loading gives every parameter group the first group's hyperparameters; the
    # groups were built from train.* (decay / no decay), so put theirs back
    decay = [g.get("weight_decay") for g in optimizer.param_groups]
    acc.load_state(str(source))
    for group, value in zip(optimizer.param_groups, decay):
        if value is not None:
            group["weight_decay"] = value
    # the data position is global: this rank's batches into the epoch are the global count over the new ranks;
    # with a new global batch that count may not divide: round up (skip, never train a sample twice)
    consumed = state.batches_in_epoch * plan.saved_world
    state.batches_in_epoch = -(-consumed // plan.world)
    skipped = state.batches_in_epoch * plan.world - consumed
    run.log(f"resume: {consumed} micro-batches of epoch {state.epoch} were consumed by {plan.saved_world} rank(s): "
            f"each of {plan.world} rank(s) skips {state.batches_in_epoch}"
            + (f", so {skipped} micro-batch(es) of this epoch are not trained on (the new split)" if skipped else ""))
    if plan.world == plan.saved_world:
        return json.loads((path / f"rng_rank{acc.process_index}.json").read_text())
    seed = elastic.reseed(run.cfg.train.seed, state.step, acc.process_index)
    run.log("resume: RNG streams re-seeded from train.seed, the step and the rank (per-rank dropout draws cannot "
            "carry over to another number of ranks)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return _rng_state()
