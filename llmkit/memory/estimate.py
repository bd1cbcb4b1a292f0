"""One run's memory estimate, term by term: the model states (llmkit.memory.states), the activations of a training
micro-batch (memory.activations), a causal LM's logits and loss over the vocabulary (`logits_bytes`), the evaluation
batch (`eval_logits_bytes`: no activations kept, but every label-word candidate scored at once), and the runtime
(the process's resident memory before the model loads, measured; on a GPU it is host memory, not the device's).
Training and evaluation never overlap, so the peak holds the larger of the two:
  live at peak = params + gathered (ZeRO-3) + gradients at peak + optimizer states + runtime
                 + max(activations + logits and loss, evaluation batch)      [+ what is offloaded, on a CPU]
"Live": bytes of tensors held at once, the quantity torch's allocator counts on a GPU (max_memory_allocated) and
the run reports as `live_peak_bytes`. What the device or process holds on top (a GPU's caching allocator, the
freed blocks glibc's malloc keeps on a CPU) is not estimated: the run reports it beside, as `peak_memory_bytes`.
Host memory at load ("host at load", `load_bytes`, llmkit.memory.states) is its own column: on a GPU it is the
host's, on a CPU the same memory as the peak (the larger counts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmkit.errors import LlmkitError

LIVE = "live at peak"  # the estimate's total: the name the run reports its measured peak of live memory under
GIB = 1024**3


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
    # gradients as DeepSpeed really holds them (llmkit.memory.states): the most at once in backward and in the step
    grad_backward_bytes: float = 0.0
    grad_step_bytes: float = 0.0
    largest_param: int = 0  # elements of the largest single trained parameter, 0 = not known
    deepspeed: bool = True  # False: plain data parallel (torch autocast, no DeepSpeed optimizer wrapper)
    trainable: int | None = None  # parameters with gradients and optimizer states (None: all of them)
    logits_bytes: float = 0.0  # a causal LM's loss over the vocabulary for one training micro-batch
    runtime_bytes: float = 0.0  # the process before the model loads (CPU ranks: on the device, host memory)
    activation_bytes: float = 0.0  # what autograd keeps of a training micro-batch (llmkit.memory.activations)
    eval_bytes: float = 0.0  # an evaluation batch's loss over the vocabulary and one layer's working set
    gathered_bytes: float = 0.0  # ZeRO-3's parameters gathered whole for compute (llmkit.memory.states)
    load_bytes: float = 0.0  # host memory while the model loads and DeepSpeed sets up (llmkit.memory.states)
    host_runtime_bytes: float = 0.0  # the runtime inside load_bytes (measured by the caller)
    device: str = "gpu"  # "gpu" or "cpu": on a CPU the offloaded states are in the same memory as the rest

    @property
    def device_bytes(self) -> float:
        """The paper's total (with DeepSpeed's fp32 master under ZeRO-1/2 in fp32): params + grads + optimizer
        states."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def grad_peak_bytes(self) -> float:
        return max(self.grad_backward_bytes, self.grad_step_bytes)

    @property
    def offloaded_here_bytes(self) -> float:
        """What offload moves to the host, when the host is the device (CPU ranks), else 0."""
        return self.host_bytes if self.device == "cpu" else 0.0

    @property
    def peak_device_bytes(self) -> float:
        """Live at peak: params + gradients at their peak + optimizer states (all held during the optimizer step)
        + the runtime, plus the larger of a training micro-batch (activations, logits and loss) and an evaluation
        batch; on a CPU also what is offloaded (the same memory)."""
        return self.param_bytes + self.gathered_bytes + self.grad_peak_bytes + self.optimizer_bytes + \
            self.runtime_bytes + self.offloaded_here_bytes + \
            max(self.activation_bytes + self.logits_bytes, self.eval_bytes)

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
                "optimizer states": self.optimizer_bytes, "offloaded (CPU)": self.offloaded_here_bytes,
                "activations": self.activation_bytes,
                "logits and loss": self.logits_bytes, "evaluation batch": self.eval_bytes,
                "runtime": self.runtime_bytes}

    def _head(self) -> str:
        trained = self.params if self.trainable is None else self.trainable
        return (f"ZeRO-{self.zero_stage}, {self.num_devices} device(s), {self.precision}, "
                f"{self.params / 1e6:,.1f}M parameters"
                + (f" ({trained / 1e6:,.2f}M trained, the rest frozen)" if trained != self.params else "")
                + (", optimizer offloaded" if self.offload_optimizer else "")
                + (", parameters offloaded" if self.offload_params else "")
                + (f", activations as on a {self.device.upper()}" if self.activation_bytes else ""))

    def _grad_note(self) -> str:
        mixed = self.precision in ("bf16", "fp16")
        if not self.deepspeed:
            return "  (no DeepSpeed: each trained weight's grad and Adam's m, v in its own dtype)"
        copies = ("fp32, no copies" if not mixed else
                  "the fp32 copies on the CPU" if self.offload_optimizer else "with the fp32 copies")
        largest = ("" if self.zero_stage < 2 else
                   f", largest param {_count(self.largest_param)}" if self.largest_param else
                   ", largest param not known")
        return (f"  (DeepSpeed: backward {self.grad_backward_bytes / GIB:.3f}{largest}; "
                f"step {self.grad_step_bytes / GIB:.3f} {copies})")

    def table(self) -> str:
        """A small human-readable table in GiB."""
        rows = [("parameters", self.param_bytes), ("gradients", self.grad_bytes),
                ("optimizer states", self.optimizer_bytes), ("total per device", self.device_bytes),
                ("gradients at peak", self.grad_peak_bytes)]
        rows += [(name, value) for name, value in (("gathered (ZeRO-3)", self.gathered_bytes),
                                                   ("offloaded (CPU)", self.offloaded_here_bytes),
                                                   ("activations", self.activation_bytes),
                                                   ("logits and loss", self.logits_bytes),
                                                   ("evaluation batch", self.eval_bytes),
                                                   ("runtime", self.runtime_bytes)) if value]
        rows.append((LIVE, self.peak_device_bytes))
        lines = [self._head()] + [f"  {name:<17} {value / GIB:10.3f} GiB" for name, value in rows]
        lines[5] += self._grad_note()  # the "gradients at peak" row
        notes = {"evaluation batch": "  (in place of activations + logits: the larger counts)",
                 "offloaded (CPU)": "  (on a CPU the offloaded states stay in the same memory)"}
        lines = [line + next((n for k, n in notes.items() if line.startswith(f"  {k:<17} ")), "") for line in lines]
        if self.load_bytes:
            lines.append(f"  {'host at load':<17} {self.load_bytes / GIB:10.3f} GiB  (the checkpoint read and "
                         "copied, DeepSpeed's setup, the runtime)")
        if self.host_bytes and self.device != "cpu":
            lines.append(f"  {'CPU (offload)':<17} {self.host_bytes / GIB:10.3f} GiB per rank")
        return "\n".join(lines)


def logits_bytes(tokens: int, vocab: int, precision: str, chunk: int = 0, tied_head: int = 0) -> float:
    """A causal LM's loss over the vocabulary for `tokens` tokens of one micro-batch. The full logits (`chunk` 0):
    the logits in the compute dtype, transformers' fp32 copy of them for the loss (mixed precision only), the fp32
    log-softmax cross-entropy keeps for backward and the fp32 gradient of the logits: tokens x vocab x
    (2 + 4 + 4 + 4) bytes in bf16/fp16, x (4 + 4 + 4) in fp32. Chunked (llmkit.model.lm_head, `chunk` positions at a
    time, each chunk's gradients made in forward): one chunk's fp32 logits, turned into their softmax and gradient
    in place, and in bf16/fp16 the 16-bit projection while its fp32 copy is made (or the 16-bit gradient made from
    it): min(tokens, chunk) x vocab x 4 bytes in fp32, x (4 + 2) in bf16/fp16 (the resident peak over the model's
    own in bench/logits_terms.py). The head weight's gradient, made in forward where the head trains, is the one
    the full path makes at the start of backward: a model state, counted with the gradients. `tied_head`: under
    ZeRO-3, where the head trains, the model's own logits get a zero gradient so that ZeRO-3 gathers the head's
    weight before its gradient lands (llmkit.model.lm_head), and the head's backward makes a gradient of its
    weight's size from it: that many elements in the compute dtype, beside the chunk."""
    if chunk:
        return _chunk_bytes(tokens, vocab, chunk, precision) + float(tied_head) * width(precision)
    return float(tokens) * vocab * (14 if precision in ("bf16", "fp16") else 12)


def eval_logits_bytes(tokens: int, vocab: int, precision: str, chunk: int = 0) -> float:
    """An evaluation batch of `tokens` tokens scored over the vocabulary (llmkit.evals.lm): the logits in the
    compute dtype, their fp32 copy, the fp32 copy the shifted slice makes, and cross-entropy's fp32 log-softmax:
    tokens x vocab x (2 + 4 + 4 + 4) bytes in bf16/fp16, x (4 + 4 + 4) in fp32; chunked, the training loss's chunk
    (logits_bytes). No gradient, but the model states stay held, so it counts against the same peak as training."""
    return _chunk_bytes(tokens, vocab, chunk, precision) if chunk else \
        float(tokens) * vocab * (14 if precision in ("bf16", "fp16") else 12)


def _chunk_bytes(tokens: int, vocab: int, chunk: int, precision: str) -> float:
    return float(min(tokens, chunk)) * vocab * (6 if precision in ("bf16", "fp16") else 4)


def width(precision: str) -> int:
    """Bytes of one element in the run's compute dtype: 2 in bf16/fp16, 4 in fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


SWITCHES = {"parameters": "ZeRO-3 (deepspeed.zero_stage 3 / a zero3 accelerate config), parameter offload, or LoRA",
            "gradients at peak": "ZeRO-2 or 3, or LoRA",
            "gathered (ZeRO-3)": "a smaller stage3_max_live_parameters and stage3_max_reuse_distance in the "
                                 "DeepSpeed config (e.g. 1e8)",
            "optimizer states": "ZeRO-1/2/3, optimizer offload, or LoRA",
            "offloaded (CPU)": "more ranks (ZeRO shards what is offloaded), or LoRA",
            "activations": "model.gradient_checkpointing true, or a smaller train.per_device_batch_size or "
                           "data.max_length (with more train.gradient_accumulation_steps)",
            "logits and loss": "a smaller train.loss_chunk (not 0: the full logits), train.per_device_batch_size or "
                               "data.max_length (with more train.gradient_accumulation_steps)",
            "evaluation batch": "a smaller train.loss_chunk (not 0: the full logits) or train.eval_batch_size",
            "runtime": "fewer ranks per machine"}


def check_fits(est: MemoryEstimate, budget: float, where: str, with_load: bool = False) -> None:
    """Refuse a run whose estimated peak exceeds `budget` bytes (`where`: what that memory is), naming the largest
    term and the switch that shrinks it. `with_load`: the budget is the host's too (CPU ranks), so the load
    phase must fit it as well."""
    if est.peak_device_bytes <= budget and not (with_load and est.load_bytes > budget):
        return
    if with_load and est.load_bytes > est.peak_device_bytes:
        raise LlmkitError(f"loading this model needs about {est.load_bytes / GIB:.2f} GiB per rank (the checkpoint "
                          f"read and copied), {where} has {budget / GIB:.2f} GiB: use ZeRO-3 with zero3_init_flag: "
                          "true in the accelerate config (each rank keeps its share), or fewer ranks per machine")
    name, value = max(est.terms().items(), key=lambda kv: kv[1])
    raise LlmkitError(f"this run needs at least {est.peak_device_bytes / GIB:.2f} GiB per device at its peak, "
                      f"{where} has {budget / GIB:.2f} GiB; the largest term is {name} "
                      f"({value / GIB:.2f} GiB): shrink it with {SWITCHES[name]}")


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}K"
