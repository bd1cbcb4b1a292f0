"""The precision a run computes in, chosen for the hardware it runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Hardware:
    """What this process can compute on: the facts the precision and loading choices depend on (tests give
    them as data, so the GPU branches run on any machine)."""

    gpus: int = 0  # CUDA devices this process sees (CUDA_VISIBLE_DEVICES="" hides them: the cpu_* configs)
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None  # compute capability of device 0
    cpu_bf16: bool = False  # AVX512-BF16 or AMX
    memory_bytes: int | None = None  # one GPU's memory, or (no GPU) the host's; None: not known, not checked

    @property
    def gpu_bf16(self) -> bool:
        """Native bf16 (Ampere, sm80, and newer). torch.cuda.is_bf16_supported() also says yes where bf16 is only
        emulated (V100, T4): a much slower run, and flash-attention refuses it."""
        return self.gpus > 0 and self.capability is not None and self.capability >= (8, 0)

    def describe_gpu(self) -> str:
        cap = f"compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else "unknown"
        return f"{self.gpu_name or 'this GPU'} ({cap})"


def hardware() -> Hardware:
    """This process's hardware."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Hardware(gpus=gpus, gpu_name=torch.cuda.get_device_name(0) if gpus else None,
                    capability=tuple(torch.cuda.get_device_capability(0)) if gpus else None,
                    cpu_bf16=cpu_has_native_bf16(),
                    memory_bytes=torch.cuda.get_device_properties(0).total_memory if gpus else _host_memory())


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def resolve_precision(requested: str, hw: Hardware | None = None) -> tuple[str, str]:
    """The precision to run in for this hardware, and why."""
    hw = hw or hardware()
    gpu = hw.gpus > 0
    if requested == "fp16" and not gpu:
        raise LlmkitError("train.precision is fp16, but no GPU is available: fp16 with loss scaling is a GPU mode. "
                          "Use precision: bf16 or fp32 (or auto) on CPU.")
    if requested == "bf16" and gpu and not hw.gpu_bf16:
        raise LlmkitError(f"train.precision is bf16, but {hw.describe_gpu()} has no native bf16 (it needs sm80, "
                          "Ampere, or newer; emulated bf16 is many times slower): use fp16 or fp32")
    if requested != "auto":
        return requested, "set in the config"
    if gpu:
        if hw.gpu_bf16:
            return "bf16", "auto: the GPU has native bf16"
        return "fp16", f"auto: {hw.describe_gpu()} has no native bf16"
    if hw.cpu_bf16:
        return "bf16", "auto: the CPU has native bf16 instructions"
    return "fp32", "auto: this CPU has no native bf16 (bf16 would be ~100x slower than fp32)"
