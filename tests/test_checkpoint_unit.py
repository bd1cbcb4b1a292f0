"""Checkpoint bookkeeping that needs no processes: pruning, pointer fallback, manifests, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llmkit import rundir
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
