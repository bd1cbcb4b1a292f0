"""Per-device memory for parameters, gradients and Adam states under ZeRO 0-3: the ZeRO paper's formulas, and
the peak as DeepSpeed (or, without it, torch) really allocates it.

Paper (Rajbhandari et al., 2020, arXiv:1910.02054): mixed precision (bf16/fp16) keeps 16-bit params and grads
(2 + 2 bytes per parameter) and an fp32 master copy plus Adam m and v (K = 12 bytes); fp32 training keeps 4-byte
params and grads and 8 bytes of Adam state. ZeRO-1 shards the optimizer states over N ranks, ZeRO-2 also the
gradients, ZeRO-3 also the parameters: DP 16P, ZeRO-1 4P + 12P/N, ZeRO-2 2P + 14P/N, ZeRO-3 16P/N.

Gradients at peak (DeepSpeed 0.19, measured by bench/zero_memory.py): in mixed precision the optimizer step
casts the 16-bit grads to fp32 copies for the fp32 master weights (4 bytes per master element) while the 16-bit
grads are still held, so the gradient peak is the larger of
  backward  stage 0 and ZeRO-1: full 16-bit grads, 2P (ZeRO-1 reduces them into its partition after backward);
            ZeRO-2/3: the 2P/N partition buffer plus the largest single param's full grad, 2L, which autograd
            makes before DeepSpeed's hook copies it into the reduce bucket (L = 0 when not known)
  step      stage 0: 2P + 4P = 6P; ZeRO-1/2/3: 2P/N + 4P/N = 6P/N (ZeRO-1/2 cast one param group at a time, so
            4P/N is an upper bound)
fp32 training makes no copies: 4P (stage 0, ZeRO-1) or 4P/N (+ 4L in backward) for ZeRO-2/3.
Optimizer states as DeepSpeed keeps them in fp32: ZeRO-1/2 still step an fp32 master partition of their own (4P/N:
stage_1_and_2.py clones this rank's partition of the flat weights whatever their dtype), so K = 12 as in mixed
precision; ZeRO-3 steps its fp32 partition in place and stage 0 the weights themselves (K = 8).
Backward also holds DeepSpeed's reduce bucket(s) (contiguous_gradients): reduce_bucket_size elements of the
grad dtype each, two with overlap_comm at ZeRO-1/2 (`bucket_bytes`); ZeRO-3 keeps its bucket through the step.
Known gap: ZeRO-1/2 size each rank's grad buffer by whole params, so one large tensor straddling the partition
boundary (MiniLM's embedding on 2 ranks) makes one rank's buffer up to a whole tensor bigger than 2P/N.

Optimizer offload (ZeRO-Offload) moves to the host what DeepSpeed allocates there, per rank (`offload_bytes`):
the fp32 master partition (4P/N), Adam's m and v (8P/N) and the fp32 gradient partition the CPU optimizer steps
from (4P/N: stage_1_and_2.py initialize_optimizer_states keeps single_partition_of_fp32_groups[i].grad on the CPU;
stage3.py a subgroup_gradient_buffer per sub-group), 16P/N; plus ZeRO-1/2's temp_grad_buffer_for_cpu_offload (the
largest param, 2L) or ZeRO-3's grad_partitions_flat_buffer (2P/N in the model's dtype, on self.device: the CPU).
The device then keeps no gradient partition: backward holds the bucket and the param's full grad (ZeRO-1: all
grads, 2P), ZeRO-1/2 also temp_grad_buffer_for_gpu_offload (2L, for the whole run); the step runs on the CPU.
Parameter offload (ZeRO-3) moves the 16-bit parameter partitions to the host.

Without DeepSpeed (plain data parallel) nothing casts the model: each trained weight, its gradient and AdamW's m
and v are in the weight's own dtype (`trained_width`: fp32 from an fp32 checkpoint, 16P; peft's adapters are made
fp32), autocast makes no grad copies, so the gradient peak is the gradient itself.
Only trained parameters have gradients and optimizer states: under LoRA the frozen base keeps just its weights
(`frozen_bytes` each: see llmkit.memory.settings for what each library keeps them in), sharded under ZeRO-3 like
every parameter; the adapters and the heads peft trains in full (modules_to_save) carry the formulas above.

ZeRO-3 also holds the parameters it gathers for compute ("gathered (ZeRO-3)", `gathered_bytes`): it frees one
only when it will not be reused within stage3_max_reuse_distance elements and keeps up to
stage3_max_live_parameters live, plus the next stage3_prefetch_bucket_size prefetched, so with DeepSpeed's
defaults (1e9 each) every model under a billion parameters stays whole on each rank while it computes:
  gathered = width x min(P, max_live_parameters + prefetch_bucket_size)

Host memory at load (`load_bytes`), per rank: transformers maps the checkpoint's safetensors and reads every page
of it once the weights are converted or copied, while the run's own copy is made; then DeepSpeed sets up.
With f the checkpoint's width (4 from scratch: the fp32 initialisation plays the file), w the run's, T trained:
  reading      = P f + P w              every rank reads the whole checkpoint and makes its copy
               = P f                    f = w below ZeRO-3: no copy, the parameters are the mapped pages
                                        (copy-on-write), which stay held through setup in the copy's place
               = P f + P w / N + L w    ZeRO-3 under zero.Init: rank 0 reads, each rank keeps its partition and
                                        gathers one tensor (L elements) at a time
  setup        = the copy + w T (ZeRO-1/2 flatten the trained weights into one buffer) + 4T / N (the fp32 master
                 partition: mixed precision, and ZeRO-1/2 in any precision; 4T at stage 0, unpartitioned)
               = w P / N + w T / N + 4T / N + 4T / N   ZeRO-3, whose copy is partitioned by now: the partitions, the
                 flat trained partition, the fp32 master and the gradient partition buffer (measured)
Measured: bench/memory_predict.py (bf16 from an fp32 checkpoint; fp32 from it, where f = w).
"""

from __future__ import annotations

from llmkit.errors import LlmkitError
from llmkit.memory.estimate import MemoryEstimate, width


def _refuse(params: int, zero_stage: int, num_devices: int, offload_optimizer: bool, offload_params: bool,
            deepspeed: bool, trained: int, largest_param: int) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise LlmkitError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    if num_devices < 1:
        raise LlmkitError(f"--num-gpus must be >= 1, got {num_devices}")
    if offload_params and zero_stage != 3:
        raise LlmkitError("parameter offload needs ZeRO-3 (--zero-stage 3)")
    if offload_optimizer and zero_stage == 0:
        raise LlmkitError("optimizer offload needs ZeRO-1, 2 or 3")
    if not deepspeed and (zero_stage or offload_optimizer):
        raise LlmkitError("ZeRO and offload need DeepSpeed")
    if not 0 <= trained <= params:
        raise LlmkitError(f"the trained parameters ({trained:,}) must be between 0 and all {params:,}")
    if not 0 <= largest_param <= trained:
        raise LlmkitError(f"the largest parameter ({largest_param:,}) must be between 0 and all {trained:,} trained")


def estimate(params: int, zero_stage: int, num_devices: int, precision: str = "bf16",
             offload_optimizer: bool = False, offload_params: bool = False,
             largest_param: int = 0, deepspeed: bool = True, bucket_bytes: float = 0.0,
             trainable: int | None = None, frozen_bytes: float | None = None,
             trained_width: float | None = None) -> MemoryEstimate:
    """Bytes per device for parameters, gradients and optimizer states (the paper's, but for the fp32 master
    partition ZeRO-1/2 keep in fp32 too), and the gradients at their peak as DeepSpeed runs them; `largest_param`
    (elements of the largest single trained tensor, 0 = not known) adds its transient full grad to ZeRO-2/3's
    backward. `deepspeed=False` (stage 0 only): plain data parallel, each
    trained weight with its grad and AdamW's m and v in `trained_width` bytes (default 4: fp32).
    `trainable` (default: all `params`) have gradients and optimizer states; the rest are frozen weights of
    `frozen_bytes` each (default: the run's parameter width)."""
    trained = params if trainable is None else trainable
    _refuse(params, zero_stage, num_devices, offload_optimizer, offload_params, deepspeed, trained, largest_param)
    mixed = precision in ("bf16", "fp16")
    if deepspeed:
        p_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 12 if _fp32_master(precision, zero_stage) else 8)
    else:  # torch keeps each trained weight's grad and AdamW's m and v in the weight's dtype
        p_b = g_b = trained_width or 4
        o_b = 2 * p_b
    f_b = p_b if frozen_bytes is None else frozen_bytes
    n = num_devices
    # the frozen weights are held, never differentiated or stepped: only the trained ones have grads and states
    param = (p_b * trained + f_b * (params - trained)) / (n if zero_stage >= 3 else 1)
    grad = g_b * trained / (n if zero_stage >= 2 else 1)
    optim = o_b * trained / (n if zero_stage >= 1 else 1)
    if not deepspeed:
        backward = step = grad
    else:
        backward, step = _grad_phases(trained, zero_stage, n, g_b, mixed, largest_param, bucket_bytes,
                                      offload_optimizer)
    host = 0.0
    if offload_optimizer:
        host += offload_bytes(trained, zero_stage, n, g_b, largest_param)
        optim = 0.0
    if offload_params:
        host += param
        param = 0.0
    return MemoryEstimate(params, zero_stage, n, precision, offload_optimizer, offload_params,
                          param, grad, optim, host, backward, step, largest_param, deepspeed, trainable)


def _fp32_master(precision: str, zero_stage: int) -> bool:
    """Whether DeepSpeed steps an fp32 master copy of the trained weights: in mixed precision, and under ZeRO-1/2
    in fp32 too (module docstring)."""
    return precision in ("bf16", "fp16") or zero_stage in (1, 2)


def _grad_phases(trained: int, zero_stage: int, n: int, g_b: int, mixed: bool, largest: int, bucket: float,
                 offload_optimizer: bool) -> tuple[float, float]:
    """DeepSpeed's gradient bytes on the device in backward and in the step (module docstring)."""
    if offload_optimizer:  # the gradient partition is on the host; the step runs there
        temp = g_b * largest if zero_stage in (1, 2) else 0.0  # temp_grad_buffer_for_gpu_offload
        held = g_b * trained if zero_stage == 1 else g_b * largest  # ZeRO-1 reduces after backward
        return held + temp + bucket, temp + (bucket if zero_stage == 3 else 0.0)
    owned = trained / (n if zero_stage >= 1 else 1)  # ZeRO-1 too reduces into its partition after backward
    backward = g_b * trained / (n if zero_stage >= 2 else 1) + (g_b * largest if zero_stage >= 2 else 0)
    step = g_b * owned + (4 * owned if mixed else 0.0)  # + the fp32 copies
    # ZeRO-1/2 have reduced and let go of the bucket by the step; ZeRO-3 keeps it
    return backward + bucket, step + (bucket if zero_stage == 3 else 0.0)


def offload_bytes(trained: int, zero_stage: int, num_devices: int, grad_width: int, largest: int) -> float:
    """Host bytes per rank of an offloaded optimizer as DeepSpeed allocates them (module docstring): the fp32
    master, Adam's m and v and the fp32 gradient partition, 16 per owned element, plus ZeRO-3's gradient partition
    buffer or ZeRO-1/2's staging buffer of the largest param."""
    owned = trained / num_devices
    return 16 * owned + (grad_width * owned if zero_stage == 3 else grad_width * largest)


def parameters_of(model) -> int:
    """Parameters of a live model, counting ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def largest_of(model) -> int:
    """Elements of a live model's largest single parameter, at full size under ZeRO-3."""
    return max((getattr(p, "ds_numel", p.numel()) for p in model.parameters()), default=0)


def bucket_bytes(zero: dict, precision: str) -> float:
    """Bytes of DeepSpeed's gradient reduce bucket(s) for a zero_optimization section (DeepSpeed's defaults:
    contiguous_gradients on, reduce_bucket_size 5e8)."""
    stage = zero.get("stage", 0)
    if stage == 0 or not zero.get("contiguous_gradients", True):
        return 0.0
    elements = float(zero.get("reduce_bucket_size", 5e8))
    return elements * width(precision) * (2 if stage in (1, 2) and zero.get("overlap_comm") else 1)


def load_bytes(params: int, file_width: float, precision: str, zero_stage: int, num_devices: int,
               trainable: int | None = None, zero_init: bool = False, largest: int = 0,
               deepspeed: bool = True, copy_width: float | None = None) -> float:
    """Host memory per rank while the model loads and DeepSpeed sets up, the runtime not included (module
    docstring); `largest`: elements of the largest tensor of the model; `copy_width`: bytes per weight of the
    run's copy (default: the compute dtype's)."""
    w, n = copy_width or width(precision), num_devices
    trained = params if trainable is None else trainable
    sharded = zero_stage == 3 and zero_init
    if file_width == w and zero_stage < 3:
        copy = 0.0  # the parameters are the checkpoint's pages
    else:
        copy = w * params / n + w * largest if sharded else w * params
    reading = file_width * params + copy
    # stage 0 keeps the whole fp32 master (as `estimate` counts it), ZeRO its partition
    master = 4 * trained / (n if zero_stage else 1) if deepspeed and _fp32_master(precision, zero_stage) else 0.0
    if zero_stage == 3:
        setup = w * params / n + w * trained / n + master + max(w, 4) * trained / n
    else:  # the copy, or the mapped pages in its place: w P either way
        setup = w * params + (w * trained if zero_stage in (1, 2) else 0.0) + master
    return max(reading, setup)


def gathered_bytes(zero: dict, params: int, precision: str, trainable: int | None = None,
                   frozen_bytes: float | None = None) -> float:
    """ZeRO-3's parameters gathered whole for compute (module docstring), 0 below stage 3."""
    if zero.get("stage", 0) != 3:
        return 0.0
    live = min(float(params), float(zero.get("stage3_max_live_parameters", 1e9))
               + float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    w = width(precision)
    trained = params if trainable is None else trainable
    frozen = w if frozen_bytes is None else frozen_bytes
    per_element = (w * trained + frozen * (params - trained)) / max(params, 1)  # a 4-bit base gathers packed
    return live * per_element
