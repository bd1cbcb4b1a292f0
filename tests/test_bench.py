"""The benchmark scripts at their smallest, so they cannot rot: the equal-work throughput comparison on a
32-row epoch, one rep, llmkit against Trainer and the hand-written loop (1 process each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_at_equal_work_runs_every_runner_on_the_same_rows(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--rows", "32", "--reps", "1",
                           "--only", "llmkit", "trainer_best", "hand_loop", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["table"]) == {"llmkit", "trainer_best", "hand_loop"} and result["tokens"] > 32
    for name, row in result["table"].items():
        assert row["rows_trained"] == [32], name  # the same work: each runner one epoch of the 32 rows
        assert row["seconds_median"] > 0
        assert row["real_tokens_per_second"] == pytest.approx(result["tokens"] / row["seconds_median"])
    assert result["table"]["llmkit"]["llmkit_speedup"] == 1.0
    assert result["cpu"]["model"] and "| llmkit |" in proc.stdout


@pytest.mark.slow
def test_mfu_reads_a_finished_run(tiny_run, tmp_path):
    """bench/mfu.py on a real 2-rank run: the GEMM peaks (timed briefly), the model FLOPs per token from the
    run's own records, and the MFU against both ceilings."""
    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mfu.py"), str(tiny_run), "--peak-seconds", "0.2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["world_size"] == 2 and not run["causal_lm"] and run["trained_non_embedding"] == run["non_embedding"]
    assert run["flops_per_token"] > 6 * run["non_embedding"] and 0 < run["mfu"] < 1
    assert run["achieved_flops"] == pytest.approx(run["real_tokens_per_second"] * run["flops_per_token"])
