"""Quantized copies (llmkit.ship.quantize, `llmkit quantize`): refused up front where they cannot be made, and an
int8 ONNX copy of a real run's classifier that onnxruntime reloads, scored against the full model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli

from llmkit import compression
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import RunDir
from llmkit.ship import card, hub, quantize


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
    real = compression.importlib.util.find_spec
    monkeypatch.setattr(compression.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n))
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
    # ... and in the run's report and its model card
    (shown,) = json.loads((tiny_run / "report.json").read_text())["runs"][0]["compression"]
    assert shown["format"] == "onnx-int8" and shown["agreement"] == made["agreement"]
    assert "### What compression costs" in (tiny_run / "report.md").read_text()
    assert "<h3>What compression costs</h3>" in (tiny_run / "report.html").read_text()
    text = card.build(RunDir(tiny_run), tiny_run / "final", "classification", "me/tiny")
    assert "## Quantized copies" in text and "- `onnx-int8/`: ONNX with int8 weights" in text
    staged = hub.stage(tiny_run, tmp_path / "upload", "me/tiny", reload=False, remember=False)  # what a push uploads
    names = {name for name, _ in staged["files"]}
    assert {"onnx-int8/model.onnx", "onnx-int8/quantized.json", "model.safetensors"} <= names, names
    assert "## Quantized copies" in (tmp_path / "upload" / "README.md").read_text()
    run = tmp_path / "run"  # a copy of the run, without its report; its copy is made again, replaced whole
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("report.*"))
    final = run / "final"
    (run / "final-onnx-int8" / "stale.txt").write_text("from the copy before")
    cmd = [sys.executable, "-m", "llmkit.cli", "quantize", "run/final", "--to", "onnx-int8"]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # a relative folder
    assert got.returncode == 0, got.stderr[-3000:]
    assert not (run / "final-onnx-int8" / "stale.txt").exists() and not (run / "final-onnx-int8.old").exists()
    assert json.loads((run / "report.json").read_text())["runs"][0]["compression"][0]["format"] == "onnx-int8"
    copy = run / "final-onnx-int8"
    assert {p.name for p in copy.iterdir()} >= {"model.onnx", "config.json", "tokenizer.json", "quantized.json"}
    assert not (run / "final-onnx-int8.tmp").exists() and not list(run.glob(".*request.json"))
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
    # a split the data lacks: refused before the copy is touched
    data = json.loads((copy / "quantized.json").read_text())["source"]
    bad = cli([*cmd[3:], "--data", data, "--split", "nosuch"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("llmkit: error: --split nosuch")
    assert (copy / "model.onnx").is_file() and not (run / "final-onnx-int8.tmp").exists()


def _tiny_bpe_llama(root, tied: bool):
    """A tiny random Llama (grouped-query attention) with a byte-level BPE tokenizer trained here, saved as an
    llmkit label-word export would be: the model, and its run records naming the data, template and words."""
    import torch
    import yaml
    from helpers import make_sentences, write_jsonl
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = make_sentences(40, seed=5)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "test.jsonl", rows)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["text"] for r in rows] * 3, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    final = root / "final"
    LlamaForCausalLM(config).save_pretrained(final)
    tok.save_pretrained(final)
    names = sorted({r["label"] for r in rows})
    (final / "training_config.yaml").write_text(yaml.safe_dump({"data": {
        "dataset": str(data), "test_split": "test", "validation_split": "test", "text_column": "text",
        "label_column": "label", "max_length": 64, "prompt_template": "review: {text}\nanswer:",
        "label_words": ["bad", "good"]}}))
    (final / "metrics.json").write_text(json.dumps({"label_names": names}))
    return final, tok


@pytest.mark.slow
@pytest.mark.parametrize("fmt,tied", [("gguf-f16", True), ("gguf-q8_0", False)])
def test_gguf_copy_of_a_label_word_llama(tmp_path, fmt, tied):
    """`llmkit quantize final --to gguf-*` on a Llama label-word export: model.gguf beside it that transformers'
    GGUF reader loads (model and tokenizer from the file alone), with the full model's tokens and nearly its
    logits; the label words classify the run's rows as the full model does. With --data (the f16 case) the rows
    are the user's, still scored by the run's label words (was: the text's perplexity, silently)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, tok = _tiny_bpe_llama(tmp_path, tied)
    rows = ["--data", "data", "--split", "test"] if fmt == "gguf-f16" else []  # relative, from the user's folder
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "quantize", str(final), "--to", fmt, *rows],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    copy = tmp_path / f"final-{fmt}"
    assert sorted(p.name for p in copy.iterdir()) == ["model.gguf", "quantized.json"]
    numbers = json.loads((copy / "quantized.json").read_text())
    assert "accuracy" in numbers["copy"] and "f1_macro" in numbers["full"], numbers
    assert numbers["rows"] == 40 and numbers["agreement"] >= (1.0 if fmt == "gguf-f16" else 0.9), numbers
    assert abs(numbers["perplexity_change"]) < (0.01 if fmt == "gguf-f16" else 0.05), numbers
    served = AutoModelForCausalLM.from_pretrained(copy, gguf_file="model.gguf", dtype=torch.float32).eval()
    served_tok = AutoTokenizer.from_pretrained(copy, gguf_file="model.gguf")
    text = "the film was very good and charming"
    assert served_tok(text)["input_ids"] == tok(text)["input_ids"]
    full = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        a, b = served(ids).logits, full(ids).logits
    assert served.config.tie_word_embeddings == tied
    assert (a - b).abs().max() < (1e-2 if fmt == "gguf-f16" else 0.1) * max(b.abs().max().item(), 1.0)


def test_gguf_refusals(tmp_path, tiny_lm):
    """A tokenizer GGUF's gpt2 vocabulary cannot hold (the word-level tiny LM) and an architecture the writer does
    not map: one line each, nothing written."""
    with pytest.raises(LlmkitError, match="not a byte-level BPE that splits text the GPT-2 way"):
        quantize.check(tiny_lm / "model", ["gguf-q8_0"])
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(LlmkitError, match="gguf-f16: .* is a Qwen2ForCausalLM; llmkit's gguf-f16 writer maps "
                                          "LlamaForCausalLM only"):
        quantize.check(qwen, ["gguf-f16"])
    with pytest.raises(LlmkitError, match="gguf-q8_0 is for causal lms and .* is a classifier: use onnx-int8"):
        cls = tmp_path / "cls"
        cls.mkdir()
        (cls / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
        quantize.check(cls, ["gguf-q8_0"])
    assert not list(tmp_path.glob("*-gguf*")) and not list(tiny_lm.glob("*-gguf*"))


@pytest.mark.slow
def test_torchao_int8_copy_reloads_with_plain_transformers(tmp_path):
    """`--to torchao-int8`: the linear layers' weights stored in int8 in Hugging Face format, which plain
    from_pretrained reloads (torchao installed) with the full model's predictions on the run's rows."""
    import torch
    from transformers import AutoModelForCausalLM

    final, tok = _tiny_bpe_llama(tmp_path, tied=False)
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "quantize", str(final), "--to", "torchao-int8"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    copy = tmp_path / "final-torchao-int8"
    config = json.loads((copy / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    numbers = json.loads((copy / "quantized.json").read_text())
    assert numbers["rows"] == 40 and numbers["agreement"] >= 0.9 and abs(numbers["perplexity_change"]) < 0.05
    served = AutoModelForCausalLM.from_pretrained(copy).eval()
    assert "Int8" in type(served.model.layers[0].mlp.up_proj.weight).__name__  # stored and served in int8
    full = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([tok("the film was very good")["input_ids"]])
    with torch.no_grad():
        a, b = served(ids).logits, full(ids).logits
    assert (a - b).abs().max() < 0.1 * max(b.abs().max().item(), 1.0)


@pytest.mark.slow
def test_gguf_copy_of_a_text_llama_gives_the_text_perplexity(tmp_path):
    """A causal LM whose run classifies nothing (no prompt template): its copy is scored by the perplexity of the
    split's text, the same sum the run's evaluation makes."""
    import yaml

    final, _ = _tiny_bpe_llama(tmp_path, tied=True)
    records = yaml.safe_load((final / "training_config.yaml").read_text())
    for key in ("prompt_template", "label_words", "label_column"):
        records["data"].pop(key)
    (final / "training_config.yaml").write_text(yaml.safe_dump(records))
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "quantize", str(final), "--to", "gguf-f16"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    numbers = json.loads((tmp_path / "final-gguf-f16" / "quantized.json").read_text())
    assert numbers["rows"] == 40 and "accuracy" not in numbers["copy"] and "agreement" not in numbers
    assert numbers["full"]["tokens"] == numbers["copy"]["tokens"] > 40  # the same tokenizer, from the file
    assert numbers["full"]["perplexity"] > 1 and abs(numbers["perplexity_change"]) < 0.01, numbers
