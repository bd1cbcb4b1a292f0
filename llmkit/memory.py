"""Per-device memory for parameters, gradients and Adam states under ZeRO 0-3, by the ZeRO paper's formulas.

Mixed precision (bf16/fp16) keeps 16-bit params and grads (2 + 2 bytes per parameter) and an fp32 master copy
plus Adam m and v (K = 12 bytes); fp32 training keeps 4-byte params and grads and 8 bytes of Adam state.
ZeRO-1 shards the optimizer states over N ranks, ZeRO-2 also the gradients, ZeRO-3 also the parameters
(Rajbhandari et al., 2020, arXiv:1910.02054): DP 16P, ZeRO-1 4P + 12P/N, ZeRO-2 2P + 14P/N, ZeRO-3 16P/N.
Activations, buffers and framework overhead are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass
class MemoryEstimate:
    params: int
    zero_stage: int
    num_devices: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    param_bytes: float  # on each device
    grad_bytes: float
    optimizer_bytes: float
    host_bytes: float  # what offload moves to CPU memory, per rank

    @property
    def device_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def table(self) -> str:
        """A small human-readable table in GiB."""
        gib = 1024**3
        rows = [("parameters", self.param_bytes), ("gradients", self.grad_bytes),
                ("optimizer states", self.optimizer_bytes), ("total per device", self.device_bytes)]
        head = (f"ZeRO-{self.zero_stage}, {self.num_devices} device(s), {self.precision}, "
                f"{self.params / 1e6:,.1f}M parameters"
                + (", optimizer offloaded" if self.offload_optimizer else "")
                + (", parameters offloaded" if self.offload_params else ""))
        lines = [head] + [f"  {name:<17} {value / gib:10.3f} GiB" for name, value in rows]
        if self.host_bytes:
            lines.append(f"  {'CPU (offload)':<17} {self.host_bytes / gib:10.3f} GiB per rank")
        return "\n".join(lines)


def estimate(params: int, zero_stage: int, num_devices: int, precision: str = "bf16",
             offload_optimizer: bool = False, offload_params: bool = False) -> MemoryEstimate:
    """Bytes per device for parameters, gradients and optimizer states."""
    if zero_stage not in (0, 1, 2, 3):
        raise LlmkitError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    if num_devices < 1:
        raise LlmkitError(f"--num-gpus must be >= 1, got {num_devices}")
    if offload_params and zero_stage != 3:
        raise LlmkitError("parameter offload needs ZeRO-3 (--zero-stage 3)")
    if offload_optimizer and zero_stage == 0:
        raise LlmkitError("optimizer offload needs ZeRO-1, 2 or 3")
    mixed = precision in ("bf16", "fp16")
    p_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    n = num_devices
    param = p_b * params / (n if zero_stage >= 3 else 1)
    grad = g_b * params / (n if zero_stage >= 2 else 1)
    optim = o_b * params / (n if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host += optim
        optim = 0.0
    if offload_params:
        host += param
        param = 0.0
    return MemoryEstimate(params, zero_stage, n, precision, offload_optimizer, offload_params,
                          param, grad, optim, host)


def count_parameters(name_or_path: str, task: str = "classification", trust_remote_code: bool = False) -> int:
    """Parameters of a model, counted from its config on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmkit.model import locate

    name = locate(name_or_path, "--model")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LlmkitError(f"could not read the config of '{name_or_path}': {exc}") from None
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def parameters_of(model) -> int:
    """Parameters of a live model, counting ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def for_run(ds_config: dict | None, params: int, num_devices: int, precision: str) -> MemoryEstimate:
    """The estimate for a run's resolved DeepSpeed config (no DeepSpeed = plain data parallel)."""
    zero = (ds_config or {}).get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

    return estimate(params, zero.get("stage", 0), num_devices, precision,
                    offload_optimizer=offloaded("offload_optimizer"), offload_params=offloaded("offload_param"))
