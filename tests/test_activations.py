"""The activations term of the memory estimate against what autograd really saves: tiny models of each family
run one training forward on the CPU in bf16 with a saved-tensors hook counting every tensor kept for backward
(each storage once, parameters left out)."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

from llmkit.memory import activations
from llmkit.memory.activations import Adapters

B, S = 2, 16
LLAMA = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             attn_implementation="sdpa")
LLAMA_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def _saved_bytes(model, **feed) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        # token ids (the embedding's) left out; a dropout mask (bool) counted
        if storage.data_ptr() not in params and (t.is_floating_point() or t.dtype == torch.bool):
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**feed)
    return sum(kept.values())


def _llama(layers: int, lora: dict | None = None, checkpointing: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA))  # its head reads the final norm
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        from llmkit.model.lora import dropout_inside_adapters  # as the run applies LoRA (apply_lora)
        model = dropout_inside_adapters(get_peft_model(model, LoraConfig(target_modules=sorted(LLAMA_TARGETS), **lora)))
    model = model.to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _ids(padded: bool) -> dict:
    mask = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask[0, :5] = 0  # left padding in one row: transformers passes the mask to attention
    return {"input_ids": torch.randint(0, 128, (B, S)), "attention_mask": mask}


@pytest.mark.parametrize("lora,padded", [(None, False), (None, True), (dict(r=4, lora_dropout=0.1), False),
                                         (dict(r=4, lora_dropout=0.0), True)],
                         ids=["full", "full-padded", "lora", "lora-no-dropout-padded"])
def test_decoder_layers_keep_what_the_formula_counts(lora, padded):
    shape = activations.shape_of(_llama(1).config)
    assert shape.family == "decoder" and (shape.hidden, shape.kv_heads, shape.head_dim) == (64, 2, 16)
    adapters = None if lora is None else Adapters(lora["r"], lora["lora_dropout"], LLAMA_TARGETS)
    feed = _ids(padded)
    # a layer: the difference between 2 layers and 1, the formula to the byte (the masks' own storage aside)
    per_layer = _saved_bytes(_llama(2, lora), **feed) - _saved_bytes(_llama(1, lora), **feed)
    assert per_layer == pytest.approx(B * S * activations.per_token_layer(shape, 2, adapters, padded, S), abs=64)
    two = activations.activation_bytes(activations.shape_of(_llama(2).config), B, S, 2, adapters, padded=padded)
    # the whole model: under LoRA the first layer keeps less (its input needs no gradient), 7% of 2 layers
    assert _saved_bytes(_llama(2, lora), **feed) == pytest.approx(two, rel=0.01 if lora is None else 0.1)


def test_a_decoder_layer_by_hand_and_a_lora_one():
    """SmolLM2-135M's widths, bf16, flash attention: 20h + 4kv + 4a + 8i + 8 bytes a token (full), and under
    LoRA r=8 on every projection with dropout 16h + 8i + 4kv + 4a + 14r + 8 (each input once, as without dropout: the
    mask is drawn again in backward; it was 30h + 9i + ...: a dropped copy and a 1-byte mask per adapter)."""
    shape = activations.Shape("decoder", 30, 576, 1536, 9, 3, 64)
    h, i, kv, a, r = 576, 1536, 192, 9, 8
    assert activations.per_token_layer(shape, 2, padded=False) == 20 * h + 4 * kv + 4 * a + 8 * i + 8
    lora = Adapters(r, 0.05, LLAMA_TARGETS)
    assert activations.per_token_layer(shape, 2, lora, padded=False) == 16 * h + 8 * i + 4 * kv + 4 * a + 14 * r + 8
    assert activations.per_token_layer(shape, 2, Adapters(r, 0.0, LLAMA_TARGETS), padded=False) == \
        activations.per_token_layer(shape, 2, lora, padded=False)
    # checkpointing: every layer's input, one layer recomputed, the final norm (4h + 4 + 2wh)
    tokens = 4 * 256
    assert activations.activation_bytes(shape, 4, 256, 2, checkpointing=True, padded=False) == \
        tokens * (30 * 2 * h + (20 * h + 4 * kv + 4 * a + 8 * i + 8) + 4 * h + 4 + 4 * h)


def test_checkpointing_keeps_each_layers_input():
    feed = _ids(False)
    shape = activations.shape_of(_llama(1).config)
    # during forward only the layer inputs are kept (one layer is recomputed later, in backward)
    per_layer = _saved_bytes(_llama(3, checkpointing=True), **feed) - _saved_bytes(_llama(2, checkpointing=True),
                                                                                   **feed)
    assert per_layer == pytest.approx(B * S * 2 * shape.hidden, rel=0.1)
    three = activations.shape_of(_llama(3).config)
    full, ckpt = (activations.activation_bytes(three, B, S, 2, checkpointing=c, padded=False) for c in (False, True))
    assert _saved_bytes(_llama(3), **feed) == pytest.approx(full, rel=0.01) and ckpt < 0.5 * full


def test_encoder_layers_keep_what_the_formula_counts():
    """BERT-like (MiniLM's layout): post-LayerNorm, GELU, dropout 0.1; on a CPU attention with dropout runs the
    math path in fp32, keeping the probabilities."""
    def bert(layers):
        torch.manual_seed(0)
        config = AutoConfig.for_model("bert", hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                      num_hidden_layers=layers, vocab_size=128, attn_implementation="sdpa")
        return AutoModel.from_config(config).to(torch.bfloat16).train()

    shape = activations.shape_of(bert(1).config)
    assert shape.family == "encoder" and shape.attention_dropout == 0.1
    feed = _ids(False)
    per_layer = _saved_bytes(bert(2), **feed) - _saved_bytes(bert(1), **feed)
    assert per_layer == pytest.approx(B * S * activations.per_token_layer(shape, 2, seq=S), abs=64)
    # by hand at h 48, i 96, 4 heads, s 16: 26h + 4i + 12as + 8
    assert activations.per_token_layer(shape, 2, seq=S) == 26 * 48 + 4 * 96 + 12 * 4 * 16 + 8


def test_other_families_use_korthikanti_and_unknown_configs_have_no_shape():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4)
    shape = activations.shape_of(config)
    assert shape.family == "gpt2" and shape.intermediate == 256
    assert activations.per_token_layer(shape, 2, seq=32) == 34 * 64 + 5 * 4 * 32
    assert activations.shape_of(type("C", (), {"model_type": "x"})()) is None
