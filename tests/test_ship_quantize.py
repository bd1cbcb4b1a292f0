"""Quantized copies (llmkit.ship.quantize, `llmkit quantize`): refused up front where they cannot be made, and an
int8 ONNX copy of a real run's classifier that onnxruntime reloads, scored against the full model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmkit import quantized
from llmkit.errors import LlmkitError
from llmkit.ship import quantize


def test_refusals_before_anything_is_written(tmp_path, monkeypatch):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(LlmkitError, match="onnx-int8 is for classifiers and .* is a causal lm"):
        quantize.check(lm, ["onnx-int8"])
    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(LlmkitError, match="unknown quantized format 'int3': llmkit writes onnx-int8"):
        quantize.check(cls, ["onnx-int8", "int3"])
    with pytest.raises(LlmkitError, match="holds no exported model"):
        quantize.check(tmp_path / "nothing", ["onnx-int8"])
    real = quantized.importlib.util.find_spec
    monkeypatch.setattr(quantized.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n))
    with pytest.raises(LlmkitError, match=r"onnx-int8 needs onnxruntime, which is not installed: pip install"):
        quantize.check(cls, ["onnx-int8"])
    assert not list(tmp_path.glob("*-onnx-int8*"))


@pytest.mark.slow
def test_onnx_int8_copy_of_a_run_classifier(tiny_run, tmp_path):
    """`llmkit quantize final --to onnx-int8` on a copy of a real run's export: final-onnx-int8/ beside it with
    the graph, the tokenizer and quantized.json; onnxruntime reloads it here and agrees with the full model on
    the rows quantized.json scored; a second run replaces the copy; a missing split is refused with nothing
    written."""
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    made = json.loads((tiny_run / "final-onnx-int8" / "quantized.json").read_text())  # by the run (output.quantize)
    assert made["rows"] == 29 and made["agreement"] >= 0.9 and (tiny_run / "final-onnx-int8" / "model.onnx").is_file()
    final = tmp_path / "final"
    shutil.copytree(tiny_run / "final", final)
    cmd = [sys.executable, "-m", "llmkit.cli", "quantize", "final", "--to", "onnx-int8"]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # a relative folder
    assert got.returncode == 0, got.stderr[-3000:]
    copy = tmp_path / "final-onnx-int8"
    assert {p.name for p in copy.iterdir()} >= {"model.onnx", "config.json", "tokenizer.json", "quantized.json"}
    assert not (tmp_path / "final-onnx-int8.tmp").exists() and not list(tmp_path.glob(".*request.json"))
    numbers = json.loads((copy / "quantized.json").read_text())
    assert numbers["split"] == "test" and numbers["rows"] == 29  # the run's records name its test split
    assert numbers["agreement"] >= 0.9, numbers
    # a tiny model's graph outweighs its weights, so its size ratio says little (bench/compression.py measures
    # MiniLM's); what is checked here: every weight matrix and the embeddings stored in 8 bits
    graph = onnx.load(str(copy / "model.onnx")).graph
    wide = [i.name for i in graph.initializer if len(i.dims) == 2 and i.data_type not in (onnx.TensorProto.INT8,
                                                                                       onnx.TensorProto.UINT8)]
    assert wide == [], wide
    assert numbers["size_ratio"] == pytest.approx(numbers["full"]["bytes"] / numbers["copy"]["bytes"])
    assert numbers["copy"]["bytes"] == (copy / "model.onnx").stat().st_size
    assert numbers["accuracy_change"] == pytest.approx(numbers["copy"]["accuracy"] - numbers["full"]["accuracy"])
    assert all(numbers[side][k] > 0 for side in ("full", "copy") for k in ("ms_per_row_batch_1", "ms_per_row_batch_32"))
    # the runtime that serves it, here: int8 MatMuls, and logits close to the full model's
    session = ort.InferenceSession(str(copy / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    tok = AutoTokenizer.from_pretrained(copy)
    texts = ["great good fun film", "boring dull bad plot", "the movie was quite moving and charming"]
    enc = tok(texts, padding=True, return_tensors="np")
    served = session.run(["logits"], {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    full = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        want = full(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(served - want).max() < 0.05 * max(np.abs(want).max(), 1.0)
    # again: replaced whole; then a split the data lacks, refused before the old copy is touched
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (copy / "quantized.json").is_file() and not (tmp_path / "final-onnx-int8.old").exists()
    data = json.loads((copy / "quantized.json").read_text())["source"]
    bad = subprocess.run(cmd + ["--data", data, "--split", "nosuch"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("llmkit: error: --split nosuch")
    assert (copy / "model.onnx").is_file() and not (tmp_path / "final-onnx-int8.tmp").exists()
