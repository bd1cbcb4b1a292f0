"""Per-device memory for parameters, gradients and Adam states under ZeRO 0-3: the ZeRO paper's formulas, and
the gradient peak as DeepSpeed really runs it.

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
            4P/N is an upper bound; optimizer offload, not measured: the fp32 copies are made on the CPU, 2P/N)
fp32 training makes no copies: 4P (stage 0, ZeRO-1) or 4P/N (+ 4L in backward) for ZeRO-2/3. `total at peak`
is params + gradients at peak + optimizer states. Without DeepSpeed (plain data parallel) autocast keeps fp32
weights and grads and makes no copies: 4P + 4P + 8P, the paper's 16P, so the peak is the paper's.
Backward also holds DeepSpeed's reduce bucket(s) (contiguous_gradients): reduce_bucket_size elements of the
grad dtype each, two with overlap_comm at ZeRO-1/2 (`bucket_bytes`); ZeRO-3 keeps its bucket through the step.
Known gap: ZeRO-1/2 size each rank's grad buffer by whole params, so one large tensor straddling the partition
boundary (MiniLM's embedding on 2 ranks) makes one rank's buffer up to a whole tensor bigger than 2P/N.
Only trained parameters have gradients and optimizer states: under LoRA the frozen base keeps just its weights,
in the run's 16-bit dtype under mixed precision (fp32 otherwise) or 4-bit NF4 under QLoRA (half a byte each),
sharded under ZeRO-3 like every parameter; the adapters and the heads peft trains in full (modules_to_save) carry
the formulas above.

Beside the model states, each its own line: the activations of a training micro-batch (llmkit.activations), a
causal LM's logits and loss over the vocabulary (`logits_bytes`), the evaluation batch (`eval_logits_bytes`: no
activations kept, but every label-word candidate scored at once), and the runtime itself (`runtime_bytes`: the
process's resident memory before the model loads, measured; on a GPU it is host memory, not the device's).
Training and evaluation never overlap, so the peak holds the larger of the two:
  total at peak = params + gradients at peak + optimizer states + runtime
                  + max(activations + logits and loss, evaluation batch)
ZeRO-3 also holds the parameters it gathers for compute ("gathered (ZeRO-3)", `gathered_bytes`): it frees one
only when it will not be reused within stage3_max_reuse_distance elements and keeps up to
stage3_max_live_parameters live, plus the next stage3_prefetch_bucket_size prefetched, so with DeepSpeed's
defaults (1e9 each) every model under a billion parameters stays whole on each rank while it computes:
  gathered = width x min(P, max_live_parameters + prefetch_bucket_size)

Host memory at load ("host at load", `load_bytes`), per rank, its own column: on a GPU it is the host's, on a CPU
the same memory as the peak (the larger counts). transformers maps the checkpoint's safetensors and reads every
page of it once the weights are converted or copied, while the run's own copy is made; then DeepSpeed sets up.
With f the checkpoint's width (4 from scratch: the fp32 initialisation plays the file), w the run's, T trained:
  host at load = runtime + max(reading, setup)
  reading      = P f + P w              every rank reads the whole checkpoint and makes its copy
               = P f + P w / N + L w    ZeRO-3 under zero.Init: rank 0 reads, each rank keeps its partition and
                                        gathers one tensor (L elements) at a time
  setup        = the copy + w T (ZeRO-1/2 flatten the trained 16-bit weights into one buffer) + 4T / N (the fp32
                 master partition, mixed precision)
               = w P / N + w T / N + 4T / N + 4T / N   ZeRO-3, whose copy is partitioned by now: the partitions, the
                 flat trained partition, the fp32 master and the gradient partition buffer (fp32 in mixed precision:
                 DeepSpeed 0.19's stage3 allocates it when the optimizer is built)
Plain data parallel in the checkpoint's own dtype makes no copy: the parameters are the mapped pages.
"""

from __future__ import annotations

import dataclasses
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
    # gradients as DeepSpeed really holds them (module docstring): the most at once in backward and in the step
    grad_backward_bytes: float = 0.0
    grad_step_bytes: float = 0.0
    largest_param: int = 0  # elements of the largest single trained parameter, 0 = not known
    deepspeed: bool = True  # False: plain data parallel (torch autocast, no DeepSpeed optimizer wrapper)
    trainable: int | None = None  # parameters with gradients and optimizer states (None: all of them)
    # a causal LM's loss over the vocabulary at its largest: a training micro-batch's (logits_bytes()) or an
    # evaluation batch's, label-word candidates included (eval_logits_bytes()), whichever is more
    logits_bytes: float = 0.0
    runtime_bytes: float = 0.0  # the process before the model loads (CPU ranks: on the device, host memory)
    activation_bytes: float = 0.0  # what autograd keeps of a training micro-batch (llmkit.activations)
    eval_bytes: float = 0.0  # an evaluation batch's loss over the vocabulary (no activations kept)
    gathered_bytes: float = 0.0  # ZeRO-3's parameters gathered whole for compute (module docstring)
    load_bytes: float = 0.0  # host memory while the model loads and DeepSpeed sets up (module docstring)
    host_runtime_bytes: float = 0.0  # the runtime inside load_bytes (measured by the caller)

    @property
    def device_bytes(self) -> float:
        """The paper's total: params + grads + optimizer states."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def grad_peak_bytes(self) -> float:
        return max(self.grad_backward_bytes, self.grad_step_bytes)

    @property
    def peak_device_bytes(self) -> float:
        """Params + gradients at their peak + optimizer states (all held during the optimizer step) + the runtime,
        plus the larger of a training micro-batch (activations, logits and loss) and an evaluation batch."""
        return self.param_bytes + self.gathered_bytes + self.grad_peak_bytes + self.optimizer_bytes + \
            self.runtime_bytes + max(self.activation_bytes + self.logits_bytes, self.eval_bytes)

    def rebased(self, runtime: float) -> MemoryEstimate:
        """The same estimate with the runtime measured again (`runtime` bytes: the process once its process group
        and DeepSpeed are up, which the preflight runs before)."""
        return dataclasses.replace(
            self, runtime_bytes=runtime if self.runtime_bytes else 0.0, host_runtime_bytes=runtime,
            load_bytes=self.load_bytes - self.host_runtime_bytes + runtime if self.load_bytes else 0.0)

    def terms(self) -> dict[str, float]:
        """Each term of the peak, by the name the table and a refusal give it."""
        return {"parameters": self.param_bytes, "gathered (ZeRO-3)": self.gathered_bytes,
                "gradients at peak": self.grad_peak_bytes,
                "optimizer states": self.optimizer_bytes, "activations": self.activation_bytes,
                "logits and loss": self.logits_bytes, "evaluation batch": self.eval_bytes,
                "runtime": self.runtime_bytes}

    def table(self) -> str:
        """A small human-readable table in GiB."""
        gib = 1024**3
        rows = [("parameters", self.param_bytes), ("gradients", self.grad_bytes),
                ("optimizer states", self.optimizer_bytes), ("total per device", self.device_bytes),
                ("gradients at peak", self.grad_peak_bytes), ("total at peak", self.peak_device_bytes)]
        trained = self.params if self.trainable is None else self.trainable
        head = (f"ZeRO-{self.zero_stage}, {self.num_devices} device(s), {self.precision}, "
                f"{self.params / 1e6:,.1f}M parameters"
                + (f" ({trained / 1e6:,.2f}M trained, the rest frozen)" if trained != self.params else "")
                + (", optimizer offloaded" if self.offload_optimizer else "")
                + (", parameters offloaded" if self.offload_params else ""))
        extra = [(name, value) for name, value in (("gathered (ZeRO-3)", self.gathered_bytes),
                                                    ("activations", self.activation_bytes),
                                                    ("logits and loss", self.logits_bytes),
                                                    ("evaluation batch", self.eval_bytes),
                                                    ("runtime", self.runtime_bytes)) if value]
        rows[-1:-1] = extra  # before "total at peak", which includes them
        lines = [head] + [f"  {name:<17} {value / gib:10.3f} GiB" for name, value in rows]
        mixed = self.precision in ("bf16", "fp16")
        copies = ("fp32, no copies" if not mixed else
                  "fp32 copies on the CPU" if self.offload_optimizer else "with the fp32 copies")
        largest = ("" if self.zero_stage < 2 else
                   f", largest param {_count(self.largest_param)}" if self.largest_param else
                   ", largest param not known")
        lines[-2 - len(extra)] += (f"  (DeepSpeed: backward {self.grad_backward_bytes / gib:.3f}{largest}; "
                      f"step {self.grad_step_bytes / gib:.3f} {copies})" if self.deepspeed else
                      "  (no DeepSpeed" + (": autocast keeps fp32 weights + grads, same 16P)" if mixed else ")"))
        if self.load_bytes:
            lines.append(f"  {'host at load':<17} {self.load_bytes / gib:10.3f} GiB  (the checkpoint read and "
                         "copied, DeepSpeed's setup, the runtime)")
        if self.eval_bytes:  # the evaluation batch replaces the training one at the peak, it does not add to it
            at = next(k for k, line in enumerate(lines) if line.startswith("  evaluation batch"))
            lines[at] += "  (in place of activations + logits: the larger counts)"
        if self.host_bytes:
            lines.append(f"  {'CPU (offload)':<17} {self.host_bytes / gib:10.3f} GiB per rank")
        return "\n".join(lines)


def logits_bytes(tokens: int, vocab: int, precision: str) -> float:
    """A causal LM's loss over the vocabulary for `tokens` tokens of one micro-batch: the logits in the compute
    dtype, transformers' fp32 copy of them for the loss (mixed precision only), the fp32 log-softmax cross-entropy
    keeps for backward and the fp32 gradient of the logits: tokens x vocab x (2 + 4 + 4 + 4) bytes in bf16/fp16,
    x (4 + 4 + 4) in fp32."""
    return float(tokens) * vocab * (14 if precision in ("bf16", "fp16") else 12)


def eval_logits_bytes(tokens: int, vocab: int, precision: str) -> float:
    """An evaluation batch of `tokens` tokens scored over the vocabulary (llmkit.evals.lm): the logits in the
    compute dtype, their fp32 copy, the fp32 copy the shifted slice makes, and cross-entropy's fp32 log-softmax:
    tokens x vocab x (2 + 4 + 4 + 4) bytes in bf16/fp16, x (4 + 4 + 4) in fp32. No gradient, but the model
    states stay held, so it counts against the same peak as training."""
    return float(tokens) * vocab * (14 if precision in ("bf16", "fp16") else 12)


def width(precision: str) -> int:
    """Bytes of one element in the run's compute dtype: 2 in bf16/fp16, 4 in fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


def check_fits(est: MemoryEstimate, budget: float, where: str, with_load: bool = False) -> None:
    """Refuse a run whose estimated peak exceeds `budget` bytes (`where`: what that memory is), naming the largest
    term and the switch that shrinks it. `with_load`: the budget is the host's too (CPU ranks), so the load
    phase must fit it as well."""
    if est.peak_device_bytes <= budget and not (with_load and est.load_bytes > budget):
        return
    if with_load and est.load_bytes > est.peak_device_bytes:
        gib = 1024**3
        raise LlmkitError(f"loading this model needs about {est.load_bytes / gib:.2f} GiB per rank (the checkpoint "
                          f"read and copied), {where} has {budget / gib:.2f} GiB: use ZeRO-3 with zero3_init_flag: "
                          "true in the accelerate config (each rank keeps its share), or fewer ranks per machine")
    name, value = max(est.terms().items(), key=lambda kv: kv[1])
    switch = {"parameters": "ZeRO-3 (deepspeed.zero_stage 3 / a zero3 accelerate config), parameter offload, or "
                            "LoRA", "gradients at peak": "ZeRO-2 or 3, or LoRA",
              "gathered (ZeRO-3)": "a smaller stage3_max_live_parameters and stage3_max_reuse_distance in the "
                                   "DeepSpeed config (e.g. 1e8)",
              "optimizer states": "ZeRO-1/2/3, optimizer offload, or LoRA",
              "activations": "model.gradient_checkpointing true, or a smaller train.per_device_batch_size or "
                             "data.max_length (with more train.gradient_accumulation_steps)",
              "logits and loss": "a smaller train.per_device_batch_size or data.max_length (with more "
                                 "train.gradient_accumulation_steps)",
              "evaluation batch": "a smaller train.eval_batch_size",
              "runtime": "fewer ranks per machine"}[name]
    gib = 1024**3
    raise LlmkitError(f"this run needs at least {est.peak_device_bytes / gib:.2f} GiB per device at its peak, "
                      f"{where} has {budget / gib:.2f} GiB; the largest term is {name} "
                      f"({value / gib:.2f} GiB): shrink it with {switch}")


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}K"


def estimate(params: int, zero_stage: int, num_devices: int, precision: str = "bf16",
             offload_optimizer: bool = False, offload_params: bool = False,
             largest_param: int = 0, deepspeed: bool = True, bucket_bytes: float = 0.0,
             trainable: int | None = None, frozen_bytes: float | None = None) -> MemoryEstimate:
    """Bytes per device for parameters, gradients and optimizer states (paper), and the gradients at their peak
    as DeepSpeed runs them; `largest_param` (elements of the largest single trained tensor, 0 = not known) adds
    its transient full grad to ZeRO-2/3's backward. `deepspeed=False` (stage 0 only): plain data parallel, where
    autocast keeps fp32 weights and grads and makes no grad copies, so the peak is the paper's 16P total.
    `trainable` (default: all `params`) have gradients and optimizer states; the rest are frozen weights of
    `frozen_bytes` each (default: the run's parameter width; 0.5 for a 4-bit QLoRA base)."""
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
    trained = params if trainable is None else trainable
    if not 0 <= trained <= params:
        raise LlmkitError(f"the trained parameters ({trained:,}) must be between 0 and all {params:,}")
    if not 0 <= largest_param <= trained:
        raise LlmkitError(f"the largest parameter ({largest_param:,}) must be between 0 and all {trained:,} trained")
    mixed = precision in ("bf16", "fp16")
    p_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    f_b = p_b if frozen_bytes is None else frozen_bytes
    n = num_devices
    # the frozen weights are held, never differentiated or stepped: only the trained ones have grads and states
    param = (p_b * trained + f_b * (params - trained)) / (n if zero_stage >= 3 else 1)
    grad = g_b * trained / (n if zero_stage >= 2 else 1)
    optim = o_b * trained / (n if zero_stage >= 1 else 1)
    # DeepSpeed's real gradient memory (module docstring)
    backward = grad + (g_b * largest_param if zero_stage >= 2 else 0)
    owned = trained / (n if zero_stage >= 1 else 1)  # ZeRO-1 too reduces into its partition after backward
    step = g_b * owned + (4 * owned if mixed and not offload_optimizer else 0.0)  # + the fp32 copies
    backward += bucket_bytes
    step += bucket_bytes if zero_stage == 3 else 0.0  # ZeRO-1/2 have reduced and let go of it by then
    if not deepspeed:  # fp32 grads (4P) in place of the paper's 2P grads + 2P of the 4P fp32 weights: same total
        backward = step = grad
    host = 0.0
    if offload_optimizer:
        host += optim
        optim = 0.0
    if offload_params:
        host += param
        param = 0.0
    return MemoryEstimate(params, zero_stage, n, precision, offload_optimizer, offload_params,
                          param, grad, optim, host, backward, step, largest_param, deepspeed, trainable)


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


def for_run(ds_config: dict | None, params: int, num_devices: int, precision: str,
            largest_param: int = 0, trainable: int | None = None, frozen_bytes: float | None = None,
            logits: float = 0.0, runtime: float = 0.0, activations: float = 0.0,
            evaluation: float = 0.0, file_width: float = 0.0, zero_init: bool = False, largest: int = 0,
            host_runtime: float = 0.0) -> MemoryEstimate:
    """The estimate for a run's resolved DeepSpeed config (no DeepSpeed = plain data parallel), with its
    activations, logits, evaluation and runtime terms (bytes); with `file_width` (bytes per weight in the
    checkpoint) also host memory at load, `host_runtime` included."""
    zero = (ds_config or {}).get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

    est = estimate(params, zero.get("stage", 0), num_devices, precision,
                   offload_optimizer=offloaded("offload_optimizer"), offload_params=offloaded("offload_param"),
                   largest_param=largest_param, deepspeed=ds_config is not None,
                   bucket_bytes=bucket_bytes(zero, precision), trainable=trainable, frozen_bytes=frozen_bytes)
    est.logits_bytes, est.runtime_bytes, est.activation_bytes, est.eval_bytes = logits, runtime, activations, evaluation
    est.gathered_bytes = gathered_bytes(zero, params, precision, trainable, frozen_bytes)
    if file_width:
        est.host_runtime_bytes = host_runtime
        est.load_bytes = host_runtime + load_bytes(params, file_width, precision, zero.get("stage", 0), num_devices,
                                                   trainable, zero_init, largest, ds_config is not None)
    return est


def load_bytes(params: int, file_width: float, precision: str, zero_stage: int, num_devices: int,
               trainable: int | None = None, zero_init: bool = False, largest: int = 0,
               deepspeed: bool = True) -> float:
    """Host memory per rank while the model loads and DeepSpeed sets up, the runtime not included (module
    docstring); `largest`: elements of the largest tensor of the model."""
    w, n = width(precision), num_devices
    trained = params if trainable is None else trainable
    sharded = zero_stage == 3 and zero_init
    if not deepspeed and file_width == w:
        copy = 0.0  # the parameters are the checkpoint's pages
    else:
        copy = w * params / n + w * largest if sharded else w * params
    reading = file_width * params + copy
    master = 4 * trained / n if deepspeed and precision in ("bf16", "fp16") else 0.0
    if zero_stage == 3:
        setup = w * params / n + w * trained / n + master + max(w, 4) * trained / n
    else:
        setup = copy + (w * trained if zero_stage in (1, 2) else 0.0) + master
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
