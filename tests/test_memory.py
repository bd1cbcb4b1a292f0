"""ZeRO memory formulas, parameter counting, the estimate-memory command, and the fp16 watchdog."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmkit import memory
from llmkit.engine import LossScaleWatchdog
from llmkit.errors import LlmkitError

P = 7_500_000_000


@pytest.mark.parametrize(("stage", "per_param"), [(0, 16), (1, 4 + 12 / 64), (2, 2 + 14 / 64), (3, 16 / 64)])
def test_paper_formulas(stage, per_param):
    est = memory.estimate(P, stage, 64, "bf16")
    assert est.device_bytes == pytest.approx(per_param * P)


def test_paper_example_numbers():
    # arXiv:1910.02054 Fig. 1: 7.5B parameters on 64 devices -> 120 / 31.4 / 16.6 / 1.9 GB
    got = [memory.estimate(P, s, 64).device_bytes / 1e9 for s in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_offload_and_fp32():
    est = memory.estimate(1000, 3, 2, "bf16", offload_optimizer=True, offload_params=True)
    assert (est.param_bytes, est.optimizer_bytes, est.grad_bytes) == (0, 0, 1000)
    assert est.host_bytes == 1000 + 6000
    fp32 = memory.estimate(1000, 0, 1, "fp32")
    assert (fp32.param_bytes, fp32.grad_bytes, fp32.optimizer_bytes) == (4000, 4000, 8000)
    with pytest.raises(LlmkitError, match="parameter offload needs ZeRO-3"):
        memory.estimate(1000, 2, 2, offload_params=True)


def test_count_parameters_matches_the_model(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    want = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_bert).parameters())
    assert memory.count_parameters(str(tiny_bert)) == want


def test_estimate_memory_command(tiny_bert):
    out = subprocess.run([sys.executable, "-m", "llmkit.cli", "estimate-memory", "--model", str(tiny_bert),
                          "--zero-stage", "2", "--num-gpus", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    params = memory.count_parameters(str(tiny_bert))
    assert f"ZeRO-2, 4 device(s), bf16, {params / 1e6:,.1f}M parameters" in out.stdout
    total = (2 + 14 / 4) * params / 1024**3
    line = next(x for x in out.stdout.splitlines() if "total per device" in x)
    assert line.split()[-2] == f"{total:.3f}"
    bad = subprocess.run([sys.executable, "-m", "llmkit.cli", "estimate-memory", "--model", str(tiny_bert),
                          "--zero-stage", "1", "--offload", "params"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "llmkit: error: parameter offload needs ZeRO-3" in bad.stderr


def test_loss_scale_watchdog():
    dog = LossScaleWatchdog(patience=3, floor=1.0)
    for step, scale in enumerate([65536, 1, 1, 2, 1, 1], start=1):
        dog.update(scale, step)  # never 3 in a row at the floor
    dog.update(None, 7)  # no scale known: no change
    with pytest.raises(LlmkitError, match="loss scale has been at its minimum \\(1\\) for 3 steps \\(step 8\\)"):
        dog.update(1, 8)
