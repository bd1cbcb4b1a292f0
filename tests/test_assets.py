"""Offline assets: the standard polarity split, idempotent install, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from llmkit import assets, metrics
from llmkit.errors import LlmkitError


def test_split_rules_on_made_up_lines():
    lines = ["1\t2.5\t  A fine film.  ", "2\t0\tNeutral text", "3\t-1.2\ta FINE film.", "4\t-3\tDreadful."]
    splits = assets.polarity_rows("\r\n".join(lines).encode())
    rows = [r for rows in splits.values() for r in rows]
    assert [r["text"] for r in sorted(rows, key=lambda r: r["id"])] == ["A fine film.", "Dreadful."]
    for split, rows_ in splits.items():
        for r in rows_:
            bucket = int(hashlib.sha256(r["text"].encode()).hexdigest(), 16) % 10
            assert split == ("test" if bucket == 0 else "validation" if bucket == 1 else "train")
            assert r["label"] == int(r["rating"] > 0)


@pytest.mark.slow
def test_installed_polarity_split_is_the_standard_one():
    root = assets.resolve("asset:polarity")
    sizes, labels = {}, {}
    for split in ("train", "validation", "test"):
        with open(f"{root}/{split}.jsonl") as fh:
            rows = [json.loads(line) for line in fh]
        sizes[split] = len(rows)
        labels[split] = sum(r["label"] for r in rows)
    assert sizes == {"train": 8433, "validation": 1038, "test": 1095}
    assert all(0.45 < labels[s] / sizes[s] < 0.55 for s in sizes)


@pytest.mark.slow
def test_installed_minilm_is_a_transformers_model():
    from transformers import AutoConfig, AutoTokenizer

    root = assets.resolve("asset:minilm")
    config = AutoConfig.from_pretrained(root)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert AutoTokenizer.from_pretrained(root).is_fast


def test_second_install_does_nothing():
    said = []
    assets.install_all(log=said.append)
    assert said == [f"assets already installed in {assets.assets_dir()}"]  # nothing fetched or converted


def test_unknown_or_missing_asset(tmp_path, monkeypatch):
    with pytest.raises(LlmkitError, match="unknown asset 'asset:nope'"):
        assets.resolve("asset:nope")
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path))
    with pytest.raises(LlmkitError, match="is not installed .* run `llmkit assets` first"):
        assets.resolve("asset:minilm")


@pytest.mark.slow
def test_changed_file_is_refused(tmp_path):
    wrong = dataclasses.replace(assets.VADER, sha256="0" * 64)
    with pytest.raises(LlmkitError, match="has sha256 5d7c06e0.*expected 0000"):
        assets.fetch(wrong, tmp_path)


@pytest.mark.slow
def test_download_failure_is_clear(tmp_path):
    missing = dataclasses.replace(assets.VADER, version="0.0.0.99")
    with pytest.raises(LlmkitError, match=r"could not download vadersentiment==0.0.0.99 from the package registry"):
        assets.fetch(missing, tmp_path)


@pytest.mark.slow
def test_installed_smollm2_is_a_plain_causal_lm_with_the_gguf_perplexity(tmp_path):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit import model as models
    from llmkit.config import ModelConfig

    root = assets.resolve("asset:smollm2")
    info = yaml.safe_load(open(f"{root}/asset.yaml"))
    assert info["perplexity_converted"] == info["perplexity_gguf"]  # checked at conversion time
    tok = AutoTokenizer.from_pretrained(root)
    assert tok.is_fast and tok.chat_template and len(tok) == 49152
    assert models.model_sizes(ModelConfig(name_or_path=root), causal_lm=True).params == 134_515_008
    # its LoRA recipe trains the adapters only: Adam's states for ~4.9M parameters, not all 134.5M (issue 24)
    from llmkit import memory
    from llmkit.config import LoraConfig

    sizes = models.model_sizes(ModelConfig(name_or_path=root), causal_lm=True, lora=LoraConfig(enabled=True, r=16))
    assert 4e6 < sizes.trainable < 6e6
    states = memory.estimate(sizes.params, 2, 2, "bf16", trainable=sizes.trainable).optimizer_bytes
    assert states == 12 * sizes.trainable / 2 and states / 2**30 < 0.03  # was 0.779 GiB counting every weight
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ppl = metrics.perplexity(assets.mean_loss(model, tok, assets.PERPLEXITY_TEXT))
    assert ppl == pytest.approx(info["perplexity_gguf"], rel=1e-4)
    assert ppl < 200  # a real language model, not random weights (those score ~49,000)
    # a plain model: no GGUF quantization entry left in its config, so fine-tuned copies save normally
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()


def test_an_older_install_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path))
    old = tmp_path / "assets" / "smollm2"
    old.mkdir(parents=True)
    (old / ".complete").write_text("ok\n")  # written by the first smollm2 installer
    assert not assets.installed("smollm2")
    with pytest.raises(LlmkitError, match="is not installed \\(or is from an older llmkit\\)"):
        assets.resolve("asset:smollm2")
