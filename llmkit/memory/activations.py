"""What autograd keeps for backward: the activations of a training micro-batch, per layer of the model family,
with and without gradient checkpointing (the memory estimate's "activations" line).

Counted from the tensors each op saves (checked against autograd's own saved tensors in
tests/test_activations.py), in bytes per token of one layer. Symbols: h hidden size, q = heads x head_dim (the
query width, h in most models), kv = kv_heads x head_dim, i the MLP's intermediate size, a heads, s the sequence
length, w the compute dtype's width (2 in bf16/fp16, 4 in fp32), r the LoRA rank.

Decoder (Llama, Mistral, Qwen2/3, SmolLM: pre-RMSNorm, RoPE, gated SiLU MLP):
  each RMSNorm        4h + 4           its fp32 input and 1/rms; + wh, the normalised input, when its weight trains
  attention, fused    w(2q + 2kv) + 4a q, k, v after RoPE, the output, fp32 log-sum-exp (flash / memory-efficient)
    a padding mask    kv -> q, + ws    transformers repeats k and v to every head when it passes a mask, and each
                                       layer keeps its own 16-bit copy of the mask (b x s x s)
    math / eager      w(q + 2q) + (4 + w)as   q and the repeated k, v; fp32 softmax and its 16-bit copy
  MLP                 3wi              gate output (SiLU's input), SiLU's output, up output
  linear inputs       once per input a trained linear reads (shared by q/k/v and by gate/up): w x in; the
                      attention output is already saved by the fused kernel
Encoder (BERT, RoBERTa, MiniLM: post-LayerNorm, GELU MLP, dropout ph on hidden states, pa on attention):
  each LayerNorm      wh + 2w          its input, mean and rstd
  hidden dropout      2wh              two masks, in the compute dtype, when ph > 0
  GELU                wi               its input
  attention, math     3mh + ma s (1 + 2 [pa > 0])  q, k, v, the softmax, its dropout mask and the dropped
                                       probabilities; m = 4 on a CPU (it upcasts 16-bit math), w on a GPU
    fused (a GPU)     3wh + 4a
  linear inputs       as for the decoder (q/k/v share the layer input)
LoRA: a frozen base linear saves nothing of its own; the adapters keep their input once per input, as trained
linears do (with dropout too: llmkit.model.lora.DroppedLinear keeps the input and draws the mask again in
backward, not a dropped copy and a mask per adapter), and the rank-r output of each A matrix (wr). Other families:
Korthikanti et al. 2022 (arXiv:2205.05198), (34h + 5as) x w/2, their GPT layer with dropout.

Outside the layers: one more norm (the decoder's final one, the encoder's embedding LayerNorm and dropout).
Under LoRA the first layer keeps a little less (its input needs no gradient: no fp32 norm input); not subtracted,
it is one norm in L layers.
Gradient checkpointing (transformers, non-reentrant) keeps each layer's input (wh per token per layer) and, during
backward, recomputes one layer at a time: L x wh + one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.model.lora import lora_targets

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2")
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra")
# which linear reads which input, per family: trained linears that share an input save it once
DECODER_INPUTS = {"norm1": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",), "norm2": ("gate_proj", "up_proj"),
                  "act": ("down_proj",)}
ENCODER_INPUTS = {"layer_in": ("query", "key", "value"), "attn_out": ("dense",), "ln1": ("dense",),
                  "act": ("dense",)}
ALL_LINEAR = frozenset(n for group in (*DECODER_INPUTS.values(), *ENCODER_INPUTS.values()) for n in group)


@dataclass(frozen=True)
class Shape:
    family: str  # "decoder", "encoder" or the model_type of another family (Korthikanti's formula)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class Adapters:
    """LoRA as the run applies it: the rank, the dropout on the adapter inputs and the adapted linears' names."""
    rank: int
    dropout: float
    targets: frozenset[str]


def shape_of(config) -> Shape | None:
    """The layer shape of a transformers config, or None where it does not name its sizes."""
    get = lambda *names, default=None: next((getattr(config, n) for n in names  # noqa: E731
                                             if getattr(config, n, None) is not None), default)
    h, layers, heads = get("hidden_size", "dim", "n_embd"), get("num_hidden_layers", "n_layers", "n_layer"), \
        get("num_attention_heads", "n_heads", "n_head")
    if not (h and layers and heads):
        return None
    kind = config.model_type
    family = "decoder" if kind in DECODERS else "encoder" if kind in ENCODERS else kind
    head_dim = get("head_dim", default=h // heads)
    return Shape(family, layers, h, get("intermediate_size", "hidden_dim", "n_inner", default=4 * h), heads,
                 get("num_key_value_heads", default=heads), head_dim,
                 float(get("hidden_dropout_prob", "dropout", "resid_pdrop", default=0.0)),
                 float(get("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", default=0.0)))


def _linear_inputs(groups: dict[str, tuple[str, ...]], widths: dict[str, int], w: int,
                   adapters: Adapters | None, shared: set[str]) -> float:
    """Bytes per token the linears keep of their inputs (module docstring: linear inputs and LoRA)."""
    total = 0.0
    for group, members in groups.items():
        width = widths[group]
        if adapters is None:  # full fine-tuning: each linear needs its input for its weight's gradient
            total += 0 if group in shared else w * width
            continue
        adapted = [m for m in members if m in adapters.targets]
        total += w * adapters.rank * len(adapted)  # A's output, read by B
        if adapted and group not in shared:  # the input, dropout or not (llmkit.model.lora.DroppedLinear)
            total += w * width
    return total


def per_token_layer(shape: Shape, w: int, adapters: Adapters | None = None, padded: bool = True,
                    seq: int = 0, device: str = "cpu", attention: str = "sdpa") -> float:
    """Bytes one layer keeps for backward per token of the micro-batch (module docstring)."""
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if shape.family == "decoder":
        norm = 4 * h + 4 + (w * h if adapters is None else 0)
        if attention == "eager":
            attn, shared = w * 3 * q + (4 + w) * a * seq, set()
        else:
            attn, shared = w * (2 * q + 2 * (q if padded else kv)) + 4 * a + (w * seq if padded else 0), \
                {"attn_out"}
        widths = {"norm1": h, "attn_out": q, "norm2": h, "act": i}
        return 2 * norm + attn + 3 * w * i + _linear_inputs(DECODER_INPUTS, widths, w, adapters, shared)
    if shape.family == "encoder":
        fused = device != "cpu" and attention != "eager"
        if fused:
            attn = 3 * w * h + 4 * a
        else:
            m = 4 if device == "cpu" and attention != "eager" else w
            attn = 3 * m * h + m * a * seq * (3 if shape.attention_dropout > 0 else 1)
        masks = 2 * w * h if shape.hidden_dropout > 0 else 0
        widths = {"layer_in": h, "attn_out": h, "ln1": h, "act": i}
        # the three "dense" linears share a name: LoRA's "dense" target adapts them all
        return 2 * (w * h + 2 * w) + masks + w * i + attn + \
            _linear_inputs(ENCODER_INPUTS, widths, w, adapters, set())
    return (34 * h + 5 * a * seq) * w / 2


def outside_layers(shape: Shape, w: int, adapters: Adapters | None) -> float:
    """Bytes per token kept outside the layers: the decoder's final norm, the encoder's embedding norm and dropout."""
    if shape.family == "decoder":
        return 4 * shape.hidden + 4 + (2 * w * shape.hidden if adapters is None else 0)
    return 2 * w * shape.hidden + 2 * w


def activation_bytes(shape: Shape, batch: int, seq: int, w: int, adapters: Adapters | None = None,
                     checkpointing: bool = False, padded: bool = True, device: str = "cpu",
                     attention: str = "sdpa") -> float:
    """Bytes autograd keeps at the end of a micro-batch's forward (batch x seq tokens): every layer's saved
    tensors, or with gradient checkpointing each layer's input and one layer recomputed."""
    tokens = batch * seq
    layer = per_token_layer(shape, w, adapters, padded, seq, device, attention)
    layers = shape.layers * w * shape.hidden + layer if checkpointing else shape.layers * layer
    return float(tokens) * (layers + outside_layers(shape, w, adapters))


def adapters_of(lora, model_type: str) -> Adapters | None:
    """The Adapters of llmkit's lora settings (a LoraConfig) for a model type; None when LoRA is off."""
    if lora is None or not lora.enabled:
        return None
    targets = lora_targets(lora, model_type)
    return Adapters(lora.r, lora.dropout, ALL_LINEAR if targets == "all-linear" else frozenset(targets))
