"""The precision a run computes in, chosen for the hardware it runs on."""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import LlmkitError

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # llmkit's names -> Accelerate's


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is ~100x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> tuple[str, str]:
    """The precision to run in for this hardware, and why."""
    gpu = torch.cuda.is_available()
    if requested == "fp16" and not gpu:
        raise LlmkitError("train.precision is fp16, but no GPU is available: fp16 with loss scaling is a GPU mode. "
                          "Use precision: bf16 or fp32 (or auto) on CPU.")
    if requested == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise LlmkitError("train.precision is bf16, but this GPU does not support bf16: use fp16 or fp32")
    if requested != "auto":
        return requested, "set in the config"
    if gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU lacks bf16"
    if cpu_has_native_bf16():
        return "bf16", "auto: the CPU has native bf16 instructions"
    return "fp32", "auto: this CPU has no native bf16 (bf16 would be ~100x slower than fp32)"
