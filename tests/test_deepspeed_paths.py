"""Every DeepSpeed path with real 2-rank runs on CPU: ZeRO 0-3, CPU offload, bf16, checkpointing, 2 nodes."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import LAUNCH_ENV, ROOT, check_ok, free_ports, launch, launch_command, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _check_export(out, stage: int, offload: str | None = None) -> dict:
    ds = json.loads((out / "ds_config.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and "auto" not in json.dumps(ds)
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu"
        if offload == "both":
            assert zero["offload_param"]["device"] == "cpu"
    weights = load_file(out / "final" / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_check"]["same_predictions"] == metrics["export_check"]["rows"] > 0
    assert metrics["train"]["zero_stage"] == stage
    return metrics


@pytest.mark.parametrize(
    ("name", "accelerate_config", "ds_file", "stage", "offload", "extra"),
    [
        ("zero2_offload", "cpu_zero2.yaml", "ds_configs/zero2_offload.json", 2, "optimizer", {}),
        ("zero3_offload", "cpu_zero3.yaml", "ds_configs/zero3_offload.json", 3, "both", {}),
        ("zero2_bf16_checkpointing", "cpu_zero2.yaml", None, 2, None,
         {"precision": "bf16", "gradient_checkpointing": True}),
        ("zero3_bf16", "cpu_zero3.yaml", None, 3, None, {"precision": "bf16"}),
    ],
)
def test_zero_paths_train_and_export(request, tmp_path, tiny_bert, tiny_data, name, accelerate_config, ds_file, stage,
                                     offload, extra):
    if offload:
        request.getfixturevalue("cpu_adam")  # pay the op's compile once, outside the launched run's timeout
    out = tmp_path / "run"
    train = {k: v for k, v in extra.items() if k != "gradient_checkpointing"}
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, **train)
    args = ["--config", str(cfg)]
    if ds_file:
        args += ["--deepspeed.config_file", str(ROOT / ds_file)]
    if extra.get("gradient_checkpointing"):
        args += ["--model.gradient_checkpointing", "true"]
    proc = launch("recipes/classification.py", args, accelerate_config, timeout=900)
    check_ok(proc)
    log = proc.stdout + proc.stderr
    precision = extra.get("precision", "fp32")
    assert f"precision {precision} (set in the config), DeepSpeed ZeRO-{stage}" in log
    assert f"ZeRO-{stage}, 2 device(s), {precision}" in log  # the memory estimate is logged at start
    metrics = _check_export(out, stage, offload)
    assert metrics["train"]["precision"] == precision


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plain_zero_stages_train_and_export(zero_runs, stage):
    """ZeRO 0-3 without offload: the shared runs of conftest.zero_runs."""
    log = zero_runs[f"zero{stage}"]["log"]
    assert f"precision fp32 (set in the config), DeepSpeed ZeRO-{stage}" in log
    assert f"ZeRO-{stage}, 2 device(s), fp32" in log  # the memory estimate is logged at start
    metrics = _check_export(zero_runs[f"zero{stage}"]["dir"], stage)
    assert metrics["train"]["precision"] == "fp32"


def test_fp16_is_refused_on_cpu_before_training(tmp_path, tiny_bert, tiny_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out", precision="fp16")
    proc = launch("recipes/classification.py", ["--config", str(cfg)])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
    assert len(errors) == 1 and "train.precision is fp16, but no GPU is available" in errors[0]
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_json_and_llmkit_config_disagree_under_launch(tmp_path, tiny_bert, tiny_data):
    ds = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    ds["gradient_accumulation_steps"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out", gradient_accumulation_steps=4)
    proc = launch("recipes/classification.py", ["--config", str(cfg), "--deepspeed.config_file", str(tmp_path / "ds.json")])
    assert proc.returncode != 0
    assert "'gradient_accumulation_steps' is 8 in the DeepSpeed config" in proc.stderr
    assert "4 from train.gradient_accumulation_steps in the llmkit config" in proc.stderr


def test_two_nodes_simulated_on_loopback_zero3(tmp_path, tiny_bert, tiny_data):
    """Two `accelerate launch` processes as two machines (one rank each) on 127.0.0.1, multi-node ZeRO-3 template."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, num_threads=1)
    port = str(free_ports(1)[0])
    procs = []
    for rank in (0, 1):
        cmd = launch_command("recipes/classification.py", ["--config", str(cfg)], "multinode_zero3.yaml",
                             launcher_args=["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                            "--main_process_ip", "127.0.0.1", "--main_process_port", port])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        check_ok(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "2 process(es), cpu, precision fp32 (set in the config), DeepSpeed ZeRO-3" in "".join(results[0])
    metrics = _check_export(out, 3)
    assert metrics["train"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with dynamic loss scaling needs a GPU")
def test_fp16_trains_on_gpu_with_dynamic_loss_scaling(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, precision="fp16")
    proc = launch("recipes/classification.py", ["--config", str(cfg)], "zero2.yaml", num_processes=1)
    check_ok(proc)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    _check_export(out, 2)
