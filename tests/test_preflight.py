"""Preflight (llmkit.launch.preflight): what it refuses and warns about before any process group starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.launch.parallel import accelerate_env
from llmkit.launch.precision import Hardware, resolve_precision
from llmkit.launch.preflight import check_devices, check_loading, check_output_dir_is_safe, warnings


def test_unsafe_output_dirs_and_remote_code_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where, why in (("/", "the filesystem root"), (str(Path.home()), "your home directory"),
                       (str(tmp_path), "the working directory"), (str(tmp_path.parent), "the working directory")):
        cfg = load_config(None, ["--data.dataset", "x", "--output.output_dir", where])
        with pytest.raises(LlmkitError, match=why):
            check_output_dir_is_safe(cfg)
    cfg = load_config(None, ["--data.dataset", "x", "--model.trust_remote_code", "true", "--model.name_or_path",
                             "someone/model"])
    (line,) = warnings(cfg)
    assert "trust_remote_code is on: Python code from 'someone/model'" in line
    assert warnings(load_config(None, ["--data.dataset", "x"])) == []


# the GPU facts given as data: what a V100, a T4, an A100 and a CPU machine make of the same config
V100 = Hardware(gpus=1, gpu_name="Tesla V100", capability=(7, 0))
T4 = Hardware(gpus=2, gpu_name="Tesla T4", capability=(7, 5))
A100 = Hardware(gpus=1, gpu_name="A100", capability=(8, 0))
CPU_AVX2, CPU_BF16 = Hardware(), Hardware(cpu_bf16=True)


def test_precision_auto_uses_bf16_only_where_it_is_native():
    assert resolve_precision("auto", A100)[0] == "bf16"
    # torch.cuda.is_bf16_supported() says yes on these (emulated): auto must not pick a slow bf16 there
    for gpu in (V100, T4):
        precision, why = resolve_precision("auto", gpu)
        assert precision == "fp16" and gpu.gpu_name in why and "no native bf16" in why
        with pytest.raises(LlmkitError, match="has no native bf16 .*use fp16 or fp32"):
            resolve_precision("bf16", gpu)
    assert resolve_precision("auto", CPU_BF16)[0] == "bf16" and resolve_precision("auto", CPU_AVX2)[0] == "fp32"
    with pytest.raises(LlmkitError, match="fp16, but no GPU"):
        resolve_precision("fp16", CPU_BF16)
    assert resolve_precision("fp16", T4) == ("fp16", "set in the config")


def test_ranks_beyond_the_visible_gpus_are_refused():
    check_devices(T4, 2)
    check_devices(CPU_AVX2, 2)  # the cpu_* configs: no GPU visible, any number of ranks
    with pytest.raises(LlmkitError, match="2 processes on this machine but 1 GPU.*--num_processes 1.*cpu_"):
        check_devices(A100, 2)


def test_loading_choices_against_the_gpu_and_the_launch():
    cfg = load_config(None, ["--data.dataset", "x", "--model.dtype", "float16"])
    with pytest.raises(LlmkitError, match="model.dtype float16 with precision fp16 and no DeepSpeed"):
        check_loading(cfg, "fp16", T4, deepspeed=False)
    check_loading(cfg, "fp16", T4, deepspeed=True)  # DeepSpeed keeps fp32 master weights
    check_loading(load_config(None, ["--data.dataset", "x"]), "fp16", T4, deepspeed=False)  # float32 weights
    flash = load_config(None, ["--data.dataset", "x", "--model.attn_implementation", "flash_attention_2"])
    with pytest.raises(LlmkitError, match="Ampere .* Tesla T4 \\(compute capability 7.5\\) is older: use sdpa"):
        check_loading(flash, "fp16", T4, deepspeed=True)
    with pytest.raises(LlmkitError, match="needs a CUDA GPU"):
        check_loading(flash, "bf16", CPU_BF16, deepspeed=True)


def test_the_cpu_configs_hide_the_gpus_from_their_ranks():
    """On a GPU machine a cpu_* config must still mean CPU: Accelerate sets CUDA_VISIBLE_DEVICES from gpu_ids
    (`llmkit validate --accelerate-config` reads it the same way), so the ranks see no GPU and use gloo."""
    configs = sorted((ROOT / "accelerate_configs").glob("cpu_*.yaml"))
    assert len(configs) == 4
    for path in configs:
        assert yaml.safe_load(path.read_text())["gpu_ids"] == "", path.name
        assert accelerate_env(path)["CUDA_VISIBLE_DEVICES"] == "", path.name
    gpu = accelerate_env(ROOT / "accelerate_configs" / "zero2.yaml")
    assert "CUDA_VISIBLE_DEVICES" not in gpu and gpu["LOCAL_WORLD_SIZE"] == gpu["WORLD_SIZE"]


def test_a_lock_left_by_an_interrupted_op_build_is_refused_not_waited_on(tmp_path, monkeypatch):
    """A DeepSpeed op build killed midway leaves torch's lock file: a launch would wait on it forever. One older
    than any build is refused with its path and how to clear it; a fresh one (a build running now) is not."""
    import os
    import time

    from llmkit.launch.preflight import STALE_LOCK_MINUTES, check_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    check_build_locks()  # being built now
    old = time.time() - (STALE_LOCK_MINUTES + 5) * 60
    os.utime(lock, (old, old))
    with pytest.raises(LlmkitError, match=f"{lock} is 15 minutes old: a build of DeepSpeed's deepspeed_shm_comm "
                                          f"op was interrupted.*rm {lock}"):
        check_build_locks()
    lock.unlink()
    check_build_locks()
