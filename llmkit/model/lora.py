"""LoRA: which linears get adapters (per architecture), the adapters applied with peft, the cheaper dropout mask
their inputs take on a CPU, and the frozen base's linears kept in the compute dtype under autocast."""

from __future__ import annotations

import torch

from llmkit.config import LoraConfig
from llmkit.errors import LlmkitError

# LoRA targets per architecture: every projection of attention and MLP, the usual strong default
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def lora_targets(lora: LoraConfig, model_type: str) -> list[str] | str:
    """The linears LoRA adapts: lora.target_modules, else this architecture's default, else peft's "all-linear"."""
    return lora.target_modules or LORA_TARGETS.get(model_type, "all-linear")


def apply_lora(model, lora: LoraConfig, task_type: str, precision: str = "fp32", zero3: bool = False):
    """Wrap `model` with peft LoRA adapters (base weights frozen); a no-op when LoRA is off. Trained in `precision`
    (not under ZeRO-3, whose weights are partitioned as they load, nor with a 4-bit base), the frozen linears are
    kept in its compute dtype (frozen_linears_in_compute_dtype)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(lora, model.config.model_type)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if isinstance(targets, list):
        missing = [t for t in targets if t not in names]
        if missing:
            raise LlmkitError(f"lora.target_modules {missing} are not modules of this {model.config.model_type} "
                              "model; pick from its linear layers, or leave lora.target_modules unset")
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=targets, task_type=task_type)
    model = cheaper_dropout(get_peft_model(model, peft_config))
    if not zero3 and not lora.load_in_4bit:
        frozen_linears_in_compute_dtype(model, precision)
    return model


class MaskDropout(torch.nn.Module):
    """peft's adapter dropout (nn.Dropout over each adapter's input), with a cheaper mask on a CPU. There, drawing
    the mask was 23% of a SmolLM2 LoRA step (bench/README.md): torch draws one random number per element, serially.
    Here one 64-bit draw gives four 16-bit fields, each element kept when its field's low 15 bits reach
    cut = round(p x 32768): kept with probability 1 - p', p' = cut / 32768 (within 2^-16 of p), independently per
    element as nn.Dropout keeps it, and scaled by 1 / (1 - p') so that the expected output is the input, exactly as
    nn.Dropout's. What stays equal: each element's keep probability (to 2^-16), independence, the expectation, the
    seeding (torch's generator, checkpointed with the run's RNG state); what differs: the random stream itself.
    On a GPU, nn.Dropout's fused kernel is already cheap and runs unchanged."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cut = round(p * 32768)
        self.scale = 32768 / (32768 - self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
        keep = (bits & 0x7FFF) >= self.cut  # random_() fills 63 bits: the top field's sign bit is always 0
        return torch.where(keep.view(x.shape), x * self.scale, 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cheaper_dropout(model):
    """Every adapter's nn.Dropout replaced by MaskDropout of the same p (a no-op without dropout)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in dropouts.items():
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    dropouts[name] = MaskDropout(layer.p)
    return model


COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_linears_in_compute_dtype(model, precision: str) -> int:
    """Under autocast (bf16 / fp16 without DeepSpeed) every frozen linear of a LoRA model in the compute dtype, once,
    instead of autocast casting its fp32 weight again at each forward (a frozen weight is not in autocast's cache,
    which keeps only leaves that require grad: 7-9% of a SmolLM2 LoRA step on a CPU, bench/README.md). What stays
    equal: autocast rounds an fp32 weight to the compute dtype for every linear, as this does once, so each product
    and the model's outputs are bit for bit the same; the adapters, the head and everything autocast leaves in
    fp32 (embeddings, norms, the output layer, a tied weight) are not touched. The export is built from the files,
    not these weights. Returns the elements cast (0: nothing to do)."""
    dtype = COMPUTE.get(precision)
    if dtype is None:
        return 0
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    others = {id(p) for m in model.modules() if not isinstance(m, (torch.nn.Linear, Conv1D))
              for p in m.parameters(recurse=False)}  # a weight tied to an embedding stays as it is
    cast = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or module is head or "original_module" in name:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad or id(p) in others or not p.is_floating_point() for p in params):
            continue
        for p in params:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast
