"""The compressed (quantized) copies llmkit writes (`llmkit quantize`, output.quantize): the formats, for which
models, served by what and needing which packages, so that a run is refused one it cannot write before it trains;
and the copies found beside an export. llmkit.ship.quantize writes and checks the copies."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.rundir.layout import QUANTIZED, Export, read_json

INSTALL = "pip install 'llmkit[compress]'"


@dataclass(frozen=True)
class Format:
    kind: str  # the models it is for: "classifier" (a sequence classifier) or "causal_lm"
    runtime: str  # what reads the copy back to score it (not always what would serve it)
    packages: tuple[str, ...]  # import names the writer and the runtime need
    what: str  # one line for the model card
    scored: str  # what was run to score it, for the report and the card
    architectures: tuple[str, ...] = ()  # the only ones its writer maps (empty: any of its kind)


FORMATS = {
    "onnx-int8": Format("classifier", "onnxruntime", ("onnx", "onnxruntime"),
                        "ONNX with int8 weights and per-batch int8 activations (onnxruntime dynamic quantization), "
                        "for onnxruntime on CPU",
                        "run by onnxruntime on CPU; its speed-up is against the full model in PyTorch fp32 eager, "
                        "so it includes the change of runtime, not only int8"),
    "gguf-f16": Format("causal_lm", "transformers' GGUF reader (dequantized; llama.cpp not run)", ("gguf",),
                       "GGUF, f16 matrices, for llama.cpp, Ollama, LM Studio and other GGUF runtimes",
                       "read by transformers' GGUF reader into fp32 and run in PyTorch: the file's weights and "
                       "tokenizer are checked, llama.cpp is not run and no speed-up is measured",
                       ("LlamaForCausalLM",)),
    "gguf-q8_0": Format("causal_lm", "transformers' GGUF reader (dequantized; llama.cpp not run)", ("gguf",),
                        "GGUF, Q8_0 matrices (8-bit blocks of 32 with one scale), for llama.cpp, Ollama, LM Studio "
                        "and other GGUF runtimes",
                        "read by transformers' GGUF reader, dequantized to fp32 and run in PyTorch: the file's "
                        "8-bit weights are checked, llama.cpp (with its 8-bit activations) is not run and no speed-up "
                        "is measured", ("LlamaForCausalLM",)),
    "torchao-int8": Format("causal_lm", "PyTorch with torchao (transformers)", ("torchao",),
                           "int8 weights (torchao's Int8WeightOnlyConfig) in Hugging Face format, which plain "
                           "`from_pretrained` reloads where torchao is installed",
                           "run by PyTorch with torchao's int8 weight-only linear layers (reloaded by transformers' "
                           "from_pretrained); no speed-up measured"),
}


def check(names: list[str], kind: str, what: str, architecture: str | None = None) -> None:
    """Refuse a format llmkit does not write, one for another kind of model (`kind` of `what`) or another
    architecture than its writer maps, or one whose packages are not installed."""
    for name in names:
        if name not in FORMATS:
            raise LlmkitError(f"unknown quantized format {name!r}: llmkit writes {', '.join(FORMATS)}")
        fmt = FORMATS[name]
        if fmt.kind != kind:
            fits = [n for n, f in FORMATS.items() if f.kind == kind]
            raise LlmkitError(f"{name} is for {fmt.kind.replace('_', ' ')}s and {what} is a "
                              f"{kind.replace('_', ' ')}: use {', '.join(fits) or 'none yet'}")
        if fmt.architectures and architecture and architecture not in fmt.architectures:
            raise LlmkitError(f"{name}: {what} is a {architecture}; llmkit's {name} writer maps "
                              f"{', '.join(fmt.architectures)} only")
        missing = [p for p in fmt.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise LlmkitError(f"{name} needs {', '.join(missing)}, which is not installed: {INSTALL}")


def gguf_tokenizer_problem(tokenizer_json: Path) -> str | None:
    """Why this tokenizer cannot go into llmkit's GGUF (whose gpt2 vocabulary is a byte-level BPE splitting text
    the GPT-2 way), or None when it can."""
    spec = json.loads(tokenizer_json.read_text()) if tokenizer_json.is_file() else {}
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel"
            or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)):
        return (f"the tokenizer ({tokenizer_json}) is not a byte-level BPE that splits text the GPT-2 way, the one "
                "vocabulary llmkit's GGUF writer maps")
    return None


def copies(final: Path) -> list[dict]:
    """The scored quantized copies beside an export (its final-<format>/ folders), each as its format, the
    folder, what it is, and its numbers (layout.QUANTIZED); the formats in FORMATS order."""
    found = []
    for name, fmt in FORMATS.items():
        folder = Export(final).quantized(name)
        numbers = read_json(folder / QUANTIZED)
        if numbers:
            found.append({"format": name, "folder": folder, "what": fmt.what, "scored": fmt.scored,
                          "numbers": numbers})
    return found
