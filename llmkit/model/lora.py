"""LoRA: which linears get adapters (per architecture), the adapters applied with peft, their inputs' dropout inside
their A matrices (a cheaper mask, less kept for backward), and the frozen base's linears kept in the compute dtype
under autocast."""

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
    model = dropout_inside_adapters(get_peft_model(model, peft_config))
    if not zero3 and not lora.load_in_4bit:
        frozen_linears_in_compute_dtype(model, precision)
    return model


def _keep(shape: torch.Size, cut: int, device: torch.device, generator=None) -> torch.Tensor:
    """Which elements an adapter's dropout keeps: one 64-bit draw gives four 16-bit fields, each element kept when
    its field's low 15 bits reach `cut` (random_() fills 63 bits: the top field's sign bit is always 0)."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    return ((bits.view(torch.int16)[:n] & 0x7FFF) >= cut).view(shape)


def _default_generator(device: torch.device):
    return torch.default_generator if device.type == "cpu" else \
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


class _DroppedProjection(torch.autograd.Function):
    """linear(dropout(x), weight), keeping for backward x itself and the generator's state before the mask was
    drawn, not the dropped copy and its mask: backward draws the same mask again from that state. Written by hand
    because autograd keeps each adapter's dropped input (a copy of x per adapter: q, k and v each keep one of the
    same x) and its mask. Under autocast the projection and its backward run in autocast's dtype, in the order
    autograd runs them, so outputs and gradients are bit for bit the unfused ones (tests/test_lora.py)."""

    @staticmethod
    def forward(ctx, x, weight, cut: int, scale: float):
        ctx.state = _default_generator(x.device).get_state()
        dropped = torch.where(_keep(x.shape, cut, x.device), x * scale, 0)
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.cut, ctx.scale = cut, scale
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        again = torch.Generator(x.device)
        again.set_state(ctx.state)
        keep = _keep(x.shape, ctx.cut, x.device, again)
        dtype = ctx.dtype or x.dtype  # the dtype the forward's linear ran in
        grad = grad.to(dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # linear's, cast back to x's dtype, then where's, then the scale's
            grad_x = torch.where(keep, (grad @ weight.to(dtype)).to(x.dtype), 0) * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x * ctx.scale, 0).to(dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


class DroppedLinear(torch.nn.Linear):
    """An adapter's A matrix with the dropout of its input inside it (peft calls lora_A(dropout(x)); the dropout
    slot becomes an Identity): what stays equal is each element's keep probability (cut / 32768, within 2^-16 of
    p), independence, the expectation (kept elements scaled by 1 / (1 - p'), as nn.Dropout scales them), the
    seeding (torch's generator, checkpointed with the run's RNG state), the parameter's name and the exported
    adapter. What differs: the random stream (a 64-bit draw makes four elements' masks: drawing one number an
    element was 23% of a SmolLM2 LoRA step on a CPU) and what backward keeps (x, shared by the adapters reading
    it, instead of a dropped copy and a mask per adapter: bench/README.md, issue 50). Off the CPU and CUDA,
    peft's own order (nn.Dropout, then the linear)."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.p = p
        self.cut = round(p * 32768)
        self.scale = 32768 / (32768 - self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        if x.device.type not in ("cpu", "cuda"):
            return super().forward(torch.nn.functional.dropout(x, self.p, True))
        return _DroppedProjection.apply(x, self.weight, self.cut, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def dropout_inside_adapters(model):
    """Every adapter with dropout: its A matrix a DroppedLinear of the same p, its dropout slot an Identity (a no-op
    without dropout, or where an adapter's A has a bias)."""
    for module in model.modules():
        dropouts, first = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(first, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            a = first[name] if name in first else None
            if type(layer) is torch.nn.Dropout and layer.p > 0 and type(a) is torch.nn.Linear and a.bias is None:
                first[name] = DroppedLinear(a, layer.p)
                dropouts[name] = torch.nn.Identity()
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
