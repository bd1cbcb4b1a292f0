"""The benchmark scripts at their smallest, so they cannot rot: the GPU script's dry path on a CPU (a tiny Llama,
then the equal-work throughput comparison on a 32-row epoch, one rep, llmkit against Trainer and the hand-written
loop), and the MFU script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_dry_path_and_throughput_at_equal_work(tmp_path):
    """bench/gpu.py --dry, the GPU script's path on a CPU: a tiny Llama with SDPA and with eager attention (tokens/s,
    MFU, peak memory in its table; fp16 said to need a GPU), and bench/throughput.py on a 32-row epoch: llmkit,
    Trainer and the hand-written loop each train exactly those rows."""
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    doc = json.loads((out / "gpu.json").read_text())
    precision = next(iter(doc["runs"].values()))["precision"]
    assert set(doc["runs"]) == {f"llama_{precision}_sdpa", f"llama_{precision}_eager"} and doc["dry"]
    for name, run in doc["runs"].items():
        assert run["tokens_per_second"] > 0 and 0 < run["mfu"] < 1 and run["peak_memory_gib"] > 0, name
        assert run["loss_scale"] == [] and f"| {name} |" in proc.stdout  # no fp16 on a CPU: no loss scale
    assert "fp16 and its watchdog: not run (fp16 needs a GPU)" in proc.stdout
    result = json.loads((out / "throughput.json").read_text())
    assert set(result["table"]) == {"llmkit", "trainer_best", "hand_loop"} == set(doc["classifier"])
    for name, row in result["table"].items():
        assert row["rows_trained"] == [32], name  # the same work: each runner one epoch of the 32 rows
        assert row["seconds_median"] > 0
        assert row["real_tokens_per_second"] == pytest.approx(result["tokens"] / row["seconds_median"])
        assert f"| {name} | {row['samples_per_second']:.1f} |" in proc.stdout
    assert result["table"]["llmkit"]["llmkit_speedup"] == 1.0 and result["cpu"]["model"]


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
    assert set(result["gemm_peak_flops"]) == {"fp32"}  # the run's precision alone is timed
    assert run["world_size"] == 2 and not run["causal_lm"] and run["trained_non_embedding"] == run["non_embedding"]
    assert run["flops_per_token"] > 6 * run["non_embedding"] and 0 < run["mfu"] < 1
    assert run["achieved_flops"] == pytest.approx(run["real_tokens_per_second"] * run["flops_per_token"])
