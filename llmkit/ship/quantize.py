"""Quantized copies of an exported model, each in its own folder beside it (final/ -> final-onnx-int8/): written
whole into a temporary folder, scored in a fresh process (by what llmkit.compression names) against the full model on
the same rows (llmkit.ship.served), and only then moved into place with its numbers (layout.QUANTIZED). What cannot
be done (a format for another kind of model, a runtime not installed) is refused before anything is written.

onnx-int8 is what a CPU serving stack picks for a sequence classifier: ONNX Runtime is the common CPU runtime
(Python, C#, Java, C++, the browser), and its dynamic int8 quantization turns every MatMul into an integer one
whose activations are quantized per batch, with no calibration data, so it applies to any exported classifier.
The graph comes from torch.onnx (TorchScript tracing: one pass, no onnxscript needed), the int8 rewrite from
onnxruntime.quantization."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llmkit import compression, fresh
from llmkit.data.sources import check_splits
from llmkit.errors import LlmkitError
from llmkit.exported.opened import CLASSIFIER, LABEL_WORDS, Opened, open_export
from llmkit.model import check_export_weights
from llmkit.rundir.layout import MODEL_CONFIG, QUANTIZED, Export
from llmkit.ship import to_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                   "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "added_tokens.json")


def check(model_dir: Path, names: list[str]) -> str:
    """Refuse, before anything is written, a format llmkit does not write, one for another kind of model or
    architecture, or one whose runtime is not installed (llmkit.compression); a GGUF whose model or tokenizer its
    writer does not map (llmkit.ship.to_gguf). Returns the model's kind: "classifier" or "causal_lm"."""
    opened = open_export(model_dir)
    kind = "classifier" if opened.kind == CLASSIFIER else "causal_lm"
    compression.check(names, kind, str(model_dir), opened.architectures[0] if opened.architectures else "an adapter")
    if any(name.startswith("gguf-") for name in names):
        to_gguf.check(opened.model)
    return kind


def rows_of_run(model_dir: Path) -> dict:
    """Where the rows to score come from when not given: the run's records beside its export (its test split,
    else its validation split, and its columns)."""
    opened = open_export(model_dir)
    data = opened.data
    split = data.get("test_split") or data.get("validation_split")
    source = data.get("dataset")
    if source is None and isinstance(data.get("data_files"), dict) and isinstance(data["data_files"].get(split), str):
        source = data["data_files"][split]
    if not source or not split:
        raise LlmkitError(f"{model_dir} has no run records naming its evaluation data: give --data and --split")
    return rows_given(opened, {"source": str(source), "split": split, "text_column": data.get("text_column", "text"),
                               "text_pair_column": data.get("text_pair_column"),
                               "label_column": data.get("label_column", "label"),
                               "max_length": data.get("max_length") or 512})


def rows_given(opened: Opened, given: dict) -> dict:
    """Rows named by the command's flags, read as the run read its own: a label-word run's prompt template, label
    words and label names go with them, so its copy is scored by label-word accuracy and agreement, as the run
    was, never silently by the text's perplexity instead."""
    if opened.kind != LABEL_WORDS:
        return dict(given)
    return {**given, "label_names": opened.labels, "prompt_template": opened.prompt_template,
            "label_words": opened.label_words}


def _write_onnx_int8(model_dir: Path, out: Path) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = dict(tokenizer(["a first example text", "and a second, longer one to pad against"], padding=True,
                            return_tensors="pt"))

    class Logits(torch.nn.Module):  # the graph's one output: the logits (not a ModelOutput)
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(sample, inputs))).logits

    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        full = Path(scratch) / "model-fp32.onnx"
        axes = {name: {0: "batch", 1: "sequence"} for name in sample}
        torch.onnx.export(Logits(), tuple(sample.values()), str(full), input_names=list(sample),
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        # per-channel weight scales: -0.1 accuracy points on the MiniLM demo, where one scale per matrix lost 1.0
        quantize_dynamic(str(full), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    for name in (MODEL_CONFIG, *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def _write_gguf(qtype: str):
    def write(model_dir: Path, out: Path) -> None:
        out.mkdir(parents=True)
        to_gguf.write(open_export(model_dir).model, out, qtype)
    return write


def _write_torchao_int8(model_dir: Path, out: Path) -> None:
    """Every linear layer's weights in int8 with a scale per output row (torchao); the embeddings stay as they
    are. Saved by transformers in its own format, with the tokenizer."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    folder = open_export(model_dir).model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)


WRITERS = {"onnx-int8": _write_onnx_int8, "gguf-f16": _write_gguf("f16"), "gguf-q8_0": _write_gguf("q8_0"),
           "torchao-int8": _write_torchao_int8}


def quantize(model_dir: str | Path, name: str, rows: dict | None = None, max_samples: int | None = None,
             log=print) -> dict:
    """Write the `name` copy of the export in `model_dir` beside it, scored against the full model on `rows`
    (source, split, columns; default: the run's evaluation split) in a fresh process; returns its numbers."""
    model_dir = fresh.absolute(model_dir)
    check(model_dir, [name])
    check_export_weights(model_dir)
    rows = rows_given(open_export(model_dir), rows) if rows else rows_of_run(model_dir)
    if Path(rows["source"]).expanduser().exists():  # a local path, read by the scoring process in another folder
        rows["source"] = str(fresh.absolute(rows["source"]))
    check_splits(rows["source"], [rows["split"]])
    out = Export(model_dir).quantized(name)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # a copy cut short earlier: never served, never kept
    log(f"quantize: writing {name} of {model_dir}, then scoring it in {compression.FORMATS[name].runtime} (a fresh "
        "process)")
    try:
        WRITERS[name](model_dir, tmp)
        ask = tmp.parent / f".{out.name}.request.json"
        ask.write_text(json.dumps({"format": name, "full": str(model_dir), "copy": str(tmp), "rows": rows,
                                   "max_samples": max_samples}))
        proc = fresh.run_python(["-m", "llmkit.ship.served", str(ask)])
        if proc.returncode != 0:
            said = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
            raise LlmkitError(f"scoring the {name} copy failed: " + (said[-1].removeprefix("llmkit: error: ") if said
                                                                     else proc.stderr[-2000:]))
        numbers = json.loads(ask.read_text())
        ask.unlink()
        (tmp / QUANTIZED).write_text(json.dumps(numbers, indent=2) + "\n")
        if out.exists():  # the previous copy stays until this one is in place
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"quantize: {out} ({summary(numbers)})")
    return numbers


def summary(n: dict) -> str:
    """One line of what the copy costs, for logs and the command's output."""
    f, q = n["full"], n["copy"]
    said = [f"accuracy {q['accuracy']:.4f} vs {f['accuracy']:.4f}, agreement {n['agreement']:.4f}"] \
        if "accuracy" in q else []
    if "perplexity" in q:
        said.append(f"perplexity {q['perplexity']:.3f} vs {f['perplexity']:.3f} ({100 * n['perplexity_change']:+.2f}%)")
    said.append(f"{n['size_ratio']:.2f}x smaller")
    if "speedup_batch_1" in n:
        said.append(f"{n['speedup_batch_1']:.2f}x / {n['speedup_batch_32']:.2f}x faster per row at batch 1 / 32")
    return ", ".join(said) + f"; {n['rows']} rows of {n['split']}"
