"""Checkpoint bookkeeping that needs no processes: pruning, pointer fallback, manifests, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llmkit import elastic, rundir
from llmkit.errors import LlmkitError
from llmkit.train import checkpoint


def _fake(root, step, files=None):
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x" * step)
    files = files or {"weights.bin": step}
    (path / rundir.MANIFEST).write_text(json.dumps({"step": step, "files": files, "fingerprint": {}}))
    return path


def test_keep_last_and_keep_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        _fake(root, step)
    state = checkpoint.TrainerState(step=10, history=[
        {"step": 4, "score": 0.91, "checkpoint": "step-4"},
        {"step": 6, "score": 0.80, "checkpoint": "step-6"},
        {"step": 8, "score": 0.85, "checkpoint": "step-8"},
    ])
    checkpoint._prune(root, keep_last=2, keep_best=1, state=state)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-10", "step-4", "step-8"]
    checkpoint._prune(root, keep_last=1, keep_best=0, state=state)
    assert [p.name for p in root.glob("step-*")] == ["step-10"]


def test_latest_falls_back_past_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root, 2)
    (root / "step-4").mkdir()  # no manifest: was being written
    (root / "latest").write_text("step-4\n")
    assert rundir.resolve_checkpoint(tmp_path, "latest") == root / "step-2"
    with pytest.raises(LlmkitError, match="step-4 is incomplete"):
        rundir.resolve_checkpoint(tmp_path, str(root / "step-4"))
    with pytest.raises(LlmkitError, match="holds no usable checkpoint"):
        rundir.resolve_checkpoint(tmp_path / "elsewhere", "latest")


def test_missing_file_is_reported(tmp_path):
    path = _fake(tmp_path, 3, files={"weights.bin": 3, "optimizer.pt": 10})
    with pytest.raises(LlmkitError, match="is damaged: optimizer.pt is missing"):
        rundir.verify_checkpoint(path)


def test_rng_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint._rng_state()))  # it must survive JSON
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


class _Payload:
    """Stands for a pickle that would run code when loaded (its class is not on the allowlist)."""

    def __init__(self):
        self.command = "echo pwned"


def test_checkpoint_files_must_pass_the_weights_only_gate(tmp_path):
    import torch

    from llmkit.train.checkpoint import check_pickles

    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "fine.pt")
    check_pickles(tmp_path)  # tensors and plain data pass
    torch.save({"state": _Payload()}, tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(LlmkitError, match="checkpoint file custom_checkpoint_0.pkl holds more than tensors and "
                                          "plain data .*_Payload.*unpickling it could run code"):
        check_pickles(tmp_path)


def test_a_users_copy_a_torn_manifest_and_same_size_damage(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _fake(root, step)
    backup = root / "step-2.bak"
    backup.mkdir()  # a user's copy is not a checkpoint: neither resume nor pruning trips over it
    checkpoint._prune(root, keep_last=1, keep_best=0, state=checkpoint.TrainerState(step=4))
    assert sorted(p.name for p in root.iterdir()) == ["step-2.bak", "step-4"] and backup.is_dir()
    _fake(root, 6)
    (root / "step-6" / rundir.MANIFEST).write_text('{"step": 6, "fil')  # torn: the write was cut short
    (root / "latest").write_text("step-6\n")
    with pytest.raises(LlmkitError, match="step-6 is damaged: its manifest.json does not parse"):
        rundir.verify_checkpoint(root / "step-6")
    assert rundir.resolve_checkpoint(tmp_path, "latest") == root / "step-4"  # falls back past it
    # a small file changed in place, same size: the manifest's sha256 catches it before anything is loaded
    path = root / "step-4"
    (path / checkpoint.STATE).write_text('{"step": 4}')
    files = {"weights.bin": 4, checkpoint.STATE: 11}
    digest = __import__("hashlib").sha256(b'{"step": 4}').hexdigest()
    (path / rundir.MANIFEST).write_text(json.dumps({"step": 4, "files": files, "sha256": {checkpoint.STATE: digest},
                                                        "fingerprint": {}}))
    rundir.verify_checkpoint(path)
    (path / checkpoint.STATE).write_text('{"step": 9}')
    with pytest.raises(LlmkitError, match="trainer_state.json does not match the sha256"):
        rundir.verify_checkpoint(path)


def test_a_corrupted_shard_is_damaged_not_dangerous(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "optim_states.pt")
    data = bytearray((tmp_path / "optim_states.pt").read_bytes())
    data[len(data) // 2:] = b"\0" * (len(data) - len(data) // 2)
    (tmp_path / "optim_states.pt").write_bytes(bytes(data))
    with pytest.raises(LlmkitError, match="is damaged: optim_states.pt cannot be read") as err:
        checkpoint.check_pickles(tmp_path)
    assert "could run code" not in str(err.value)


def _saved_by(root, world, accumulation, batch=8, stage=2):
    """A checkpoint folder whose manifest says it was written by `world` ranks x `accumulation`."""
    root.mkdir(parents=True, exist_ok=True)
    engine = root / elastic.DS_TAG
    engine.mkdir(exist_ok=True)
    for rank in range(world):
        (engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    (engine / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    fingerprint = {"world_size": world, "gradient_accumulation_steps": accumulation, "per_device_batch_size": batch,
                   "zero_stage": stage}
    (root / rundir.MANIFEST).write_text(json.dumps({"step": 4, "files": {}, "fingerprint": fingerprint}))
    return root


def _cfg(accumulation=1, batch=8, new_global_batch=False, streaming=False):
    from llmkit.config import Config

    cfg = Config()
    cfg.train.gradient_accumulation_steps, cfg.train.per_device_batch_size = accumulation, batch
    cfg.checkpoint.resume_from, cfg.checkpoint.new_global_batch = "latest", new_global_batch
    cfg.data.streaming = streaming
    return cfg


def test_the_batch_decision_of_a_resume(tmp_path):
    """The global batch is kept by the accumulation, refused with the choices, or changed only when asked."""
    ckpt = _saved_by(tmp_path / "a", world=2, accumulation=2)
    assert elastic.decide(_cfg(accumulation=2), ckpt, 2) is None  # as written
    cfg = _cfg(accumulation=2)
    plan = elastic.decide(cfg, ckpt, 4)
    assert cfg.train.gradient_accumulation_steps == 1 and plan.universal and not plan.new_global_batch
    assert "global batch kept at 4 micro-batches per step (gradient accumulation 2 -> 1)" in plan.describe()
    with pytest.raises(LlmkitError, match=r"3 ranks cannot split that evenly.*Resume on 1, 2, 4 rank\(s\), or "
                                          r"continue with a global batch of 48 rows .*new_global_batch true"):
        elastic.decide(_cfg(accumulation=2), ckpt, 3)
    cfg = _cfg(accumulation=2, new_global_batch=True)
    plan = elastic.decide(cfg, ckpt, 3)  # asked for: this launch's accumulation, 3 x 2 x 8 rows
    assert plan.new_global_batch and plan.record()["global_batch"] == 48 and plan.record()["saved_global_batch"] == 32
    assert "NEW global batch (checkpoint.new_global_batch): 32 -> 48 rows per step" in plan.describe()
    with pytest.raises(LlmkitError, match="train.gradient_accumulation_steps is 3, but checkpoint .* was trained "
                                          "with 2: a resume keeps the global batch"):
        elastic.decide(_cfg(accumulation=3), ckpt, 2)
    plan = elastic.decide(_cfg(accumulation=3, new_global_batch=True), ckpt, 2)  # same ranks: nothing to convert
    assert plan.new_global_batch and not plan.universal and "on the 2 rank(s) that wrote it" in plan.describe()
    with pytest.raises(LlmkitError, match="leave it at the checkpoint's value"):
        elastic.decide(_cfg(accumulation=4), ckpt, 4)  # neither the saved 2 nor the 1 that keeps the batch
    with pytest.raises(LlmkitError, match="per_device_batch_size 8; a resume keeps its batches of rows"):
        elastic.decide(_cfg(accumulation=2, batch=4, new_global_batch=True), ckpt, 4)
    with pytest.raises(LlmkitError, match="a streamed run resumes on 2 ranks only"):
        elastic.decide(_cfg(accumulation=2, streaming=True, new_global_batch=True), ckpt, 4)
    # the disk the conversion needs: twice the optimizer shards plus the model states, none once it exists
    assert elastic.universal_bytes(ckpt) == 2 * 600 + 100
    (ckpt / elastic.UNIVERSAL).mkdir()
    (ckpt / elastic.UNIVERSAL / rundir.MANIFEST).write_text("{}")
    assert elastic.universal_bytes(ckpt) == 0
