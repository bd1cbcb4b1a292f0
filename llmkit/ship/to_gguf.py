"""A Llama-family causal LM (a full export, or a LoRA run's merged/) as one GGUF file, f16 or Q8_0, for
llama.cpp-family runtimes (and transformers' `gguf_file=` reader). Written with the gguf package: its writer, its
map from transformers tensor names to GGUF's, its Q8_0 quantizer and its BPE vocabulary readers. What is done here
is only what no library does for a transformers folder (llama.cpp's converter is a script in its repository, not a
package): the metadata from config.json, and q/k rows reordered for GGUF's rotary layout.

Covered, and refused up front otherwise: LlamaForCausalLM (SmolLM2, Llama 2 shapes) without rope scaling, with a
byte-level BPE tokenizer that splits text the GPT-2 way (what SmolLM2's does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmkit import compression
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import FINAL, MERGED, MODEL_CONFIG

QTYPES = {"f16": "F16", "q8_0": "Q8_0"}
GGUF_FILE = "model.gguf"


def check(folder: Path) -> dict:
    """The model's config, once it is one this writer covers; one line naming what is not, otherwise."""
    config = json.loads((folder / MODEL_CONFIG).read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM":
        raise LlmkitError(f"GGUF: {folder} is a {arch}; llmkit's GGUF writer maps LlamaForCausalLM only (SmolLM2, "
                          "Llama-2 shapes)")
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise LlmkitError(f"GGUF: {folder} uses rope scaling, which llmkit's GGUF writer does not map")
    problem = compression.gguf_tokenizer_problem(folder / "tokenizer.json")
    if problem:
        raise LlmkitError(f"GGUF: {problem}")
    return config


def _to_gguf_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers keeps each head's rotary halves apart (first half, second half); GGUF interleaves them in
    pairs. The inverse of what readers undo (transformers' LlamaTensorProcessor)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write(folder: Path, out: Path, qtype: str) -> None:
    """`folder` (a transformers causal LM) as out/model.gguf, its matrices in `qtype` (f16 or q8_0)."""
    import gguf
    from safetensors.torch import load_file

    config = check(folder)
    kind = getattr(gguf.GGMLQuantizationType, QTYPES[qtype])
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = gguf.GGUFWriter(str(out / GGUF_FILE), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(folder.parent.name if folder.name in (FINAL, MERGED) else folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
        "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _vocabulary(gguf, folder, writer, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    tied = config.get("tie_word_embeddings", False)
    for name, value in weights.items():
        if tied and name == "lm_head.weight":
            continue  # tied: the runtime reads the output layer from token_embd
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LlmkitError(f"GGUF: the tensor {name} of {folder} has no GGUF name for a Llama model")
        value = value.float().numpy()  # bf16 has no numpy type
        if name.endswith("q_proj.weight"):
            value = _to_gguf_rows(value, heads)
        elif name.endswith("k_proj.weight"):
            value = _to_gguf_rows(value, kv_heads)
        if value.ndim == 1:  # norms stay f32, as llama.cpp keeps them
            writer.add_tensor(new, value)
        elif kind == gguf.GGMLQuantizationType.Q8_0 and value.shape[-1] % 32 == 0:
            writer.add_tensor(new, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:  # f16, and a Q8_0 matrix whose rows are not whole 32-value blocks
            writer.add_tensor(new, value.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vocabulary(gguf, folder: Path, writer, vocab_size: int) -> None:
    """The tokens (special ones marked control, so readers keep them whole), merges, special ids and chat
    template, read by the gguf package's BpeVocab and SpecialVocab."""
    vocab = gguf.BpeVocab(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for text, _, _ in vocab.all_tokens():
        piece = text.decode("utf-8") if isinstance(text, bytes) else text
        tokens.append(piece)
        types.append(gguf.TokenType.CONTROL if piece in special else gguf.TokenType.NORMAL)
    for i in range(len(tokens), vocab_size):  # an embedding larger than the vocabulary: unused rows
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
