"""Checkpoints, in one place: where they are, how they are written crash-safe, verified, matched to the run
that resumes them, and loaded for an exact resume.

A checkpoint is `<output_dir>/checkpoints/step-<n>/`: Accelerate's `save_state` (model, optimizer and, under
DeepSpeed, the engine's ZeRO shards), the LR scheduler, each rank's RNG states, and `trainer_state.json`
(global step, data position). It is written under a temporary name and renamed into place by rank 0 only after
every rank has finished; `manifest.json` (files, sizes, small files' sha256, and the fingerprint a resume must
match) is written last inside it, and the `latest` pointer moves after the rename. The preflight resolves and
verifies the checkpoint a run resumes once (`resolve`); the resume loads that one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit import faults
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.rundir import elastic, layout, manifest
from llmkit.rundir.layout import RunDir, fsync_dir, write_durably

LATEST = "latest"  # in checkpoints/: the name of the newest complete checkpoint


def steps(root: Path) -> list[Path]:
    """The checkpoint folders step-<n> under `root`, oldest first (a user's step-2.bak is not one)."""
    found = [p for p in root.glob(layout.checkpoint_name("*"))
             if p.is_dir() and re.fullmatch(layout.checkpoint_name(r"\d+"), p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


OPTIMIZER_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler",
                  "warmup_ratio", "max_grad_norm")


def fingerprint(cfg: Config, world_size: int, zero_stage: int | None, precision: str,
                data_identity: dict | None = None, accumulation: int | None = None) -> dict:
    """What a resumed run must share with the checkpoint for the continuation to be the same training run: the
    model, the data's content and labels (known once the data is tokenized; until then its source), how the work
    is split and computed, and the optimizer's hyperparameters (the saved optimizer and LR schedule continue)."""
    t = cfg.train
    return {
        "model": cfg.model.name_or_path, "data": data_identity or {"dataset": cfg.data.dataset or cfg.data.data_files},
        "world_size": world_size, "zero_stage": zero_stage, "precision": precision,
        "per_device_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": accumulation or t.gradient_accumulation_steps, "seed": t.seed,
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


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues: resolved and verified once, by the preflight; the loop loads this one."""
    path: Path
    recorded: dict  # its manifest's fingerprint: the run that wrote it
    elastic: elastic.Elastic | None = None  # continued on another number of ranks, or with a new global batch


def resolve(run: RunDir, resume_from: str) -> Resume:
    """`latest` or a path -> a verified checkpoint of `run`; with `latest`, falls back to the newest good one."""
    root = run.checkpoints
    if resume_from != LATEST:
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise LlmkitError(f"checkpoint.resume_from: '{resume_from}' is not a checkpoint folder")
        if steps(path) and not (path / manifest.MANIFEST).is_file():
            raise LlmkitError(f"checkpoint.resume_from: '{resume_from}' is the folder holding the checkpoints; name "
                              f"one step-<n> inside it ({steps(path)[-1]} is the newest) or use 'latest'")
        return Resume(path, manifest.verify(path).get("fingerprint") or {})
    pointer = root / LATEST
    candidates = steps(root)[::-1]
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    problems = []
    for path in candidates:
        try:
            return Resume(path, manifest.verify(path).get("fingerprint") or {})
        except LlmkitError as exc:
            problems.append(str(exc))
    detail = ("; ".join(problems)) if problems else "none was written"
    raise LlmkitError(f"checkpoint.resume_from is 'latest' but {root} holds no usable checkpoint ({detail})")


# ------------------------------------------------------------ save and load


STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: enough to continue from the exact next batch."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # batches of `epoch` already consumed by this rank
    history: list[dict] = field(default_factory=list)  # each eval at a checkpoint step: step, score, checkpoint


def run_fingerprint(run) -> dict:
    """This run's fingerprint (`fingerprint`), with the data it trains on (`run.data_identity`)."""
    return fingerprint(run.cfg, run.accelerator.num_processes, run.zero_stage, run.precision,
                       getattr(run, "data_identity", None), run.accumulation)


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


def save(run, trainer_state: TrainerState, keep_last: int | None, keep_best: int, rank_state: dict | None = None,
         add: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint step-<n> atomically (all ranks must call this) and prune old ones; `rank_state`: more of
    this rank's own state (a stream's position), kept beside its RNG states; `add(folder)`: rank 0 puts more of
    the run's records into the checkpoint before its manifest (the training dynamics so far)."""
    acc = run.accelerator
    root = run.dir.checkpoints
    final = root / layout.checkpoint_name(trainer_state.step)
    tmp = root / f".tmp-{final.name}"
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
        previous = latest_name(root)
        raise LlmkitError(f"writing checkpoint {final.name} failed on {failed} rank(s)"
                          + (f" ({failure.__class__.__name__}: {failure})" if failure else "")
                          + f"; nothing was replaced: the previous checkpoint ({previous or 'none yet'}) and export "
                          "are intact. Free disk space, then continue with --checkpoint.resume_from latest.")
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(asdict(trainer_state), indent=1))
        if add is not None:
            add(tmp)
        manifest.write(tmp, step=trainer_state.step, fingerprint=run_fingerprint(run))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        write_durably(root / LATEST, final.name + "\n")
        _prune(root, keep_last, keep_best, trainer_state)
    acc.wait_for_everyone()
    return final


def latest_name(root: Path) -> str | None:
    """The name `latest` points at, if any (for messages)."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _prune(root: Path, keep_last: int | None, keep_best: int, state: TrainerState) -> None:
    done = [p for p in steps(root) if (p / manifest.MANIFEST).is_file()]
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


def load(run, optimizer) -> tuple[TrainerState, dict]:
    """Restore the checkpoint the preflight resolved (`run.resume`) into the prepared objects; return the trainer
    state and this rank's RNG state. Its data must be the run's (known now that the rows are read).

    The caller restores the RNG state itself, once the data iterator has started: starting one draws from
    torch's RNG, and the uninterrupted run drew that number before the checkpoint, not after."""
    acc, path = run.accelerator, run.resume.path
    refuse_other_run(path, run.resume.recorded, run_fingerprint(run), elastic=run.elastic is not None)
    check_pickles(path)
    saved = json.loads((path / STATE).read_text())
    # fields an older llmkit wrote and never read (sampler_seed, best_metric, best_step) are left out
    state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
    if run.elastic is None:
        acc.load_state(str(path))
        rng = json.loads((path / f"rng_rank{acc.process_index}.json").read_text())
    else:
        rng = _load_elsewhere(run, path, state, optimizer)
    run.log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, batch {state.batches_in_epoch}")
    return state, rng


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
    # ... and it hands every sub-group one and the same Adam step tensor (stage3.py: state[...]["step"] = state_step),
    # which AdamW advances in place once per sub-group: with two groups the step count rose twice a step, and Adam's
    # bias correction with it. Each state gets its own copy.
    for kept in optimizer.state.values():
        if torch.is_tensor(kept.get("step")):
            kept["step"] = kept["step"].clone()
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
