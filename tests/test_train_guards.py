"""Training guards (llmkit.train.guards, meter): a diverged loss stops the run with its step and keeps the last
good checkpoint; the fp16 loss-scale watchdog."""

from __future__ import annotations

import json

import pytest
from helpers import faulty_run

from llmkit.errors import LlmkitError
from llmkit.train.guards import LossScaleWatchdog


def test_loss_scale_watchdog():
    dog = LossScaleWatchdog(patience=3, floor=1.0)
    for step, scale in enumerate([65536, 1, 1, 2, 1, 1], start=1):
        dog.update(scale, step)  # never 3 in a row at the floor
    dog.update(None, 7)  # no scale known: no change
    with pytest.raises(LlmkitError, match="loss scale has been at its minimum \\(1\\) for 3 steps \\(step 8\\)"):
        dog.update(1, 8)
    sampled = LossScaleWatchdog(patience=25, floor=1.0)  # read every 10 steps (torch's GradScaler)
    sampled.update(1, 10, steps=10)
    sampled.update(4, 20, steps=10)  # back above the floor: the count restarts
    sampled.update(1, 30, steps=10)
    sampled.update(1, 40, steps=10)
    with pytest.raises(LlmkitError, match="for 30 steps \\(step 50\\)"):
        sampled.update(1, 50, steps=10)


def test_a_lasting_fault_fires_from_its_step_on(monkeypatch):
    """overflow@5:0 (bench/gpu.py's watchdog run) holds from step 5 on, on rank 0 only."""
    from llmkit import faults

    monkeypatch.setattr(faults, "SPEC", "overflow@5:0")
    monkeypatch.setattr(faults, "POINT", "overflow")
    assert [faults.from_step("overflow", s, 0) for s in (4, 5, 9)] == [False, True, True]
    assert not faults.from_step("overflow", 9, 1) and not faults.from_step("nan", 9, 0)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, tiny_data):
    out, _, proc = faulty_run(tmp_path, tiny_bert, tiny_data, 2, "nan@3:1", logging_steps=10)
    assert ("llmkit: error: the training loss became NaN/inf at step 3: training diverged. The last good "
            "checkpoint is step-2") in proc.stderr
    assert "Traceback" not in proc.stderr.split("llmkit: error:")[0]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    assert json.loads((checkpoints / "step-2" / "manifest.json").read_text())["step"] == 2
    assert not (out / "final").exists()
