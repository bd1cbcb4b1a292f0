"""The quantized formats llmkit writes (`llmkit quantize`, output.quantize): for which models, served by what, and
the packages each needs, so that a run is refused one it cannot write before it trains. llmkit.ship.quantize
writes and checks the copies."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from llmkit.errors import LlmkitError

INSTALL = "pip install 'llmkit[compress]'"


@dataclass(frozen=True)
class Format:
    kind: str  # the models it is for: "classifier" (a sequence classifier) or "causal_lm"
    runtime: str  # what serves the copy, and reloads it for its check
    packages: tuple[str, ...]  # import names the writer and the runtime need
    what: str  # one line for the model card


FORMATS = {
    "onnx-int8": Format("classifier", "onnxruntime", ("onnx", "onnxruntime"),
                        "ONNX with int8 weights and per-batch int8 activations (onnxruntime dynamic quantization), "
                        "for onnxruntime on CPU"),
}


def check(names: list[str], kind: str, what: str) -> None:
    """Refuse a format llmkit does not write, one for another kind of model (`kind` of `what`), or one whose
    packages are not installed."""
    for name in names:
        if name not in FORMATS:
            raise LlmkitError(f"unknown quantized format {name!r}: llmkit writes {', '.join(FORMATS)}")
        fmt = FORMATS[name]
        if fmt.kind != kind:
            fits = [n for n, f in FORMATS.items() if f.kind == kind]
            raise LlmkitError(f"{name} is for {fmt.kind.replace('_', ' ')}s and {what} is a "
                              f"{kind.replace('_', ' ')}: use {', '.join(fits) or 'none yet'}")
        missing = [p for p in fmt.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise LlmkitError(f"{name} needs {', '.join(missing)}, which is not installed: {INSTALL}")
