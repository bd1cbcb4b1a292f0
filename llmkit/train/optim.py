"""The optimizer, its learning-rate schedule, and the optional torch.compile of the model's blocks."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from llmkit.config import Config, TrainConfig
from llmkit.errors import LlmkitError


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm weights."""
    t = cfg.train
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # a ZeRO-3 model loaded partitioned holds each weight as an empty 1-D tensor: its shape is ds_shape
            # (without this every weight skipped its decay under ZeRO-3: check-numerics found it)
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[t.adamw_impl]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             **kernel)


def build_scheduler(t: TrainConfig, optimizer, total_steps: int):
    """Warmup then linear / cosine decay (or constant), stepped once per optimizer step by the loop.

    Built on the prepared optimizer: ZeRO-3 regroups the parameters, and Accelerate would hand DeepSpeed only
    DeepSpeed's own scheduler types anyway."""
    name = t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def compile_blocks(model) -> int:
    """torch.compile each block of the model's repeated layer stack, in place: one compiled graph serves every
    layer, the parameter names stay as they are (checkpoints and exports unchanged), DeepSpeed's wrapper stays
    outside. Dynamic shapes, because padded lengths differ from batch to batch."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
              and len({type(block) for block in m}) == 1]
    if not stacks:
        raise LlmkitError(f"train.torch_compile: {type(model).__name__} has no stack of repeated layers to compile; "
                          "turn train.torch_compile off")
    blocks = [block for stack in stacks for block in stack]
    for block in blocks:
        block.compile(backend="inductor", dynamic=True)
    return len(blocks)
