"""One memory estimate for one run's settings. `llmkit estimate-memory` and the preflight both build a `Settings`
(`settings_of`: from a config, the DeepSpeed JSON the run resolves and the model's sizes) and call `for_settings`;
the preflight then only checks that the result fits.

What each library keeps a weight in, per term (bytes per element):
  trained, DeepSpeed          the formulas of llmkit.memory.states (16-bit weights and grads, fp32 master + Adam)
  trained, no DeepSpeed       the weight's own dtype for its grad and AdamW's m, v: the loaded dtype (full
                              fine-tuning) or fp32 (peft makes 16-bit adapters fp32: autocast_adapter_dtype)
  frozen, DeepSpeed           bf16/fp16: 2, the engine casts the whole module (_cast_module_mixed_precision);
                              fp32: 4 (it casts nothing: the weights are taken to load in fp32)
  frozen, no DeepSpeed        the loaded dtype: model.dtype, else the checkpoint's own (transformers' dtype "auto"),
                              fp32 from scratch. LoRA in bf16/fp16: the frozen linears (Sizes.quantized: those
                              bitsandbytes would pack) in the compute dtype, llmkit.model.lora casts them once.
                              QLoRA: fp32, as peft's prepare_model_for_kbit_training upcasts every 16-bit weight
                              that is not 4-bit
  frozen, QLoRA's 4-bit       NF4_BYTES: bitsandbytes' Linear4bit packs two weights a byte, with double
                              quantization one uint8 absmax per 64 and one fp32 per 256 of those; only the nn.Linear
                              layers transformers converts (not the embeddings, norms or the output head: Sizes.
                              quantized); the rest as any frozen weight above
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmkit.config import Config
from llmkit.memory import activations
from llmkit.memory.estimate import MemoryEstimate, eval_logits_bytes, logits_bytes, width
from llmkit.memory.states import bucket_bytes, estimate, gathered_bytes, load_bytes
from llmkit.model import (
    Sizes,
    lm_head,  # which models take the chunked loss (train.loss_chunk)
)

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed nibbles + double-quantized absmax (bitsandbytes quantize_4bit)


@dataclass(frozen=True)
class Settings:
    """Everything the estimate reads about a run."""
    sizes: Sizes  # the model as it trains (LoRA adapters included)
    devices: int  # data-parallel ranks in all
    precision: str  # bf16, fp16 or fp32 (resolved)
    zero: dict | None = None  # the resolved zero_optimization section; None: no DeepSpeed (plain data parallel)
    device: str = "gpu"  # "gpu" or "cpu": the activations' kernels, and whether the host is the device
    lora: bool = False
    qlora: bool = False  # the frozen base in 4-bit NF4
    load_width: float = 4.0  # bytes per weight as transformers loads them (frozen_width)
    file_width: float = 0.0  # bytes per weight of the checkpoint read at load (0: no "host at load")
    zero_init: bool = False  # ZeRO-3 partitions the model as it loads (zero3_init_flag)
    shape: activations.Shape | None = None  # the layers' sizes (None: activations not known)
    adapters: activations.Adapters | None = None
    batch: int = 0  # rows per training micro-batch (0: no micro-batch, the model states only)
    seq: int = 0  # tokens per row
    eval_rows: int = 0  # rows of one evaluation batch, every label-word candidate counted
    vocab: int = 0  # a causal LM's vocabulary (0: no loss over it)
    packed: bool = False  # rows packed into blocks: no padding mask
    checkpointing: bool = False
    attention: str = "sdpa"
    runtime: float = 0.0  # the process's resident bytes before the model loads
    chunk: int = 0  # positions projected onto the vocabulary at once (llmkit.model.lm_head); 0: the full logits


def frozen_width(s: Settings) -> float:
    """Bytes per frozen weight that is not 4-bit, as the libraries keep it (module docstring)."""
    if s.zero is not None:
        return width(s.precision)
    return 4.0 if s.qlora else s.load_width


def for_settings(s: Settings) -> MemoryEstimate:
    """The memory estimate of a run: what `llmkit estimate-memory` prints and the preflight checks."""
    sizes, w = s.sizes, width(s.precision)
    frozen = sizes.params - sizes.trainable
    # the frozen linears: 4-bit under QLoRA; in the compute dtype under LoRA with autocast (llmkit.model.lora)
    cast = s.lora and not s.qlora and s.zero is None and s.precision in ("bf16", "fp16")
    quantized = min(sizes.quantized, frozen) if s.qlora or cast else 0
    per_linear = NF4_BYTES if s.qlora else w
    per_frozen = (per_linear * quantized + frozen_width(s) * (frozen - quantized)) / frozen if frozen else None
    tokens = s.batch * s.seq
    acts, kernels = 0.0, "cuda" if s.device == "gpu" else "cpu"
    if s.batch and s.shape is not None:
        acts = activations.activation_bytes(s.shape, s.batch, s.seq, w, s.adapters, s.checkpointing,
                                            padded=not s.packed, device=kernels, attention=s.attention)
    # an evaluation batch keeps no activations, but each layer's forward holds its working set at once: counted as
    # what one layer keeps for backward at the evaluation's tokens (once the logits are chunked it can be the larger)
    layer = 0.0
    if s.eval_rows and s.shape is not None:
        layer = s.eval_rows * s.seq * activations.per_token_layer(
            s.shape, w, None, not s.packed, s.seq, kernels, s.attention)
    # ZeRO-3 with the head trained: its own backward's gradient, the size of its weight (vocab x hidden)
    tied = s.vocab * s.shape.hidden if s.zero and s.zero.get("stage") == 3 and not s.lora and s.shape else 0
    return for_run(None if s.zero is None else {"zero_optimization": s.zero}, sizes.params, s.devices,
                   s.precision, largest_param=sizes.largest_trainable, trainable=sizes.trainable,
                   frozen_bytes=per_frozen, logits=logits_bytes(tokens, s.vocab, s.precision, s.chunk, tied),
                   runtime=s.runtime if s.device == "cpu" else 0.0,  # on a GPU the runtime is host memory
                   activations=acts, evaluation=layer + eval_logits_bytes(s.eval_rows * s.seq, s.vocab,
                                                                          s.precision, s.chunk),
                   file_width=s.file_width, zero_init=s.zero_init, largest=sizes.largest, host_runtime=s.runtime,
                   trained_width=4.0 if s.lora else s.load_width, copy_width=s.load_width, device=s.device)


def for_run(ds_config: dict | None, params: int, num_devices: int, precision: str,
            largest_param: int = 0, trainable: int | None = None, frozen_bytes: float | None = None,
            logits: float = 0.0, runtime: float = 0.0, activations: float = 0.0,
            evaluation: float = 0.0, file_width: float = 0.0, zero_init: bool = False, largest: int = 0,
            host_runtime: float = 0.0, trained_width: float | None = None, copy_width: float | None = None,
            device: str = "gpu") -> MemoryEstimate:
    """The estimate for a resolved DeepSpeed config (None: plain data parallel) with its activations, logits,
    evaluation and runtime terms given in bytes; with `file_width` (bytes per weight in the checkpoint) also host
    memory at load, `host_runtime` included. Without DeepSpeed: `trained_width` bytes per trained weight, and the
    loaded copy `copy_width` bytes per weight."""
    zero = (ds_config or {}).get("zero_optimization", {})
    deepspeed = ds_config is not None

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

    est = estimate(params, zero.get("stage", 0), num_devices, precision,
                   offload_optimizer=offloaded("offload_optimizer"), offload_params=offloaded("offload_param"),
                   largest_param=largest_param, deepspeed=deepspeed, bucket_bytes=bucket_bytes(zero, precision),
                   trainable=trainable, frozen_bytes=frozen_bytes, trained_width=trained_width)
    est.logits_bytes, est.runtime_bytes, est.activation_bytes, est.eval_bytes = logits, runtime, activations, evaluation
    est.gathered_bytes = gathered_bytes(zero, params, precision, trainable, frozen_bytes)
    est.device = device
    if file_width:
        est.host_runtime_bytes = host_runtime
        est.load_bytes = host_runtime + load_bytes(params, file_width, precision, zero.get("stage", 0), num_devices,
                                                   trainable, zero_init, largest, deepspeed,
                                                   copy_width=None if deepspeed else copy_width)
    return est


def resident_bytes() -> float:
    """This process's resident memory now (Linux), else 0: not known."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def _dtype_width(dtype) -> float | None:
    return None if dtype is None else 2.0 if str(dtype).endswith(("bfloat16", "float16")) else 4.0


def file_width(cfg: Config, config) -> float:
    """Bytes per weight of what the model loads from: the checkpoint's dtype (what transformers maps and reads;
    a 4-bit base is quantized from it), fp32 for a model initialised from scratch."""
    if cfg.model.from_scratch:
        return 4.0
    return _dtype_width(getattr(config, "dtype", None)) or 4.0  # transformers reads a torch_dtype key into it


def load_width(cfg: Config, config, precision: str) -> float:
    """Bytes per weight as transformers loads them (llmkit.model.loading_options): model.dtype, else QLoRA's
    compute dtype, else the checkpoint's own (dtype "auto"), fp32 from scratch."""
    if cfg.model.dtype:
        return _dtype_width(cfg.model.dtype)
    if cfg.lora.enabled and cfg.lora.load_in_4bit:
        return float(width(precision))
    return file_width(cfg, config)


def settings_of(cfg: Config, ds: dict | None, sizes: Sizes, precision: str, world_size: int, device: str, config,
                causal: bool, runtime: float = 0.0, zero_init: bool = False, micro_batch: bool = True) -> Settings:
    """The Settings of a run from its config, its resolved DeepSpeed config (None: none) and its model's
    transformers `config` and sizes; `micro_batch` False leaves the training and evaluation batches out."""
    d, t, lora = cfg.data, cfg.train, cfg.lora if cfg.lora.enabled else None
    # plain text is packed into blocks: no padding mask (prompt/response and chat rows are, unless data.packing)
    packed = causal and (d.packing or (not d.prompt_template and d.format in ("auto", "text")
                                       and not (d.prompt_column or d.messages_column)))
    candidates = 1
    if causal and d.prompt_template:  # label words score every label's candidate row (at least 2 labels)
        labels = d.label_words or d.label_names
        candidates = len(labels) if labels else 2
    shape = activations.shape_of(config)
    adapters = activations.adapters_of(lora, config.model_type) if shape is not None else None
    return Settings(sizes, world_size, precision, None if ds is None else ds.get("zero_optimization", {}), device,
                    lora is not None, lora is not None and lora.load_in_4bit, load_width(cfg, config, precision),
                    file_width(cfg, config), zero_init, shape, adapters,
                    t.per_device_batch_size if micro_batch else 0, d.max_length,
                    t.eval_batch_size * candidates if micro_batch else 0,
                    (getattr(config, "vocab_size", 0) or 0) if causal else 0, packed,
                    cfg.model.gradient_checkpointing, cfg.model.attn_implementation or "sdpa", runtime,
                    t.loss_chunk if causal and lm_head.logit_change(config) is None else 0)
