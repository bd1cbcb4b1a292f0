"""Models (llmkit.model): loading local dirs, from-scratch init, clear errors for bad paths / offline Hub ids; on a
tiny Llama, full training reaches every weight and LoRA freezes the base, merges exactly and names bad targets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

from llmkit import model
from llmkit.config import LoraConfig, ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model import lora as lora_module


def test_classifier_gets_label_maps(tiny_bert):
    net = model.load_classifier(ModelConfig(name_or_path=str(tiny_bert)), ["neg", "neu", "pos"])
    assert net.config.num_labels == 3
    assert net.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and net.config.label2id["pos"] == 2
    assert net.classifier.out_features == 3


def test_from_scratch_and_gradient_checkpointing(tiny_bert):
    cfg = ModelConfig(name_or_path=str(tiny_bert), from_scratch=True, gradient_checkpointing=True)
    torch.manual_seed(123)
    net = model.load_classifier(cfg, ["a", "b"])
    saved = load_file(tiny_bert / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(net.state_dict()[key], saved[key])  # random init, not the saved weights
    on = net.is_activation_checkpointing if hasattr(net, "is_activation_checkpointing") else net.is_gradient_checkpointing
    assert on
    assert model.hidden_size(model.read_config(cfg)) == 32


def test_bad_model_paths(tmp_path):
    with pytest.raises(LlmkitError, match="model.name_or_path './nope/model' does not exist"):
        model.load_classifier(ModelConfig(name_or_path="./nope/model"), ["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmkitError, match="is a directory without config.json"):
        model.load_classifier(ModelConfig(name_or_path=str(tmp_path / "empty")), ["a", "b"])


@pytest.mark.slow
def test_hub_ids_fail_clearly_offline():
    # a fresh process: the Hub libraries read HF_HUB_OFFLINE once, at import
    code = textwrap.dedent("""
        from llmkit import model
        from llmkit.data import sources
        from llmkit.config import DataConfig, ModelConfig
        from llmkit.errors import LlmkitError
        for load in (lambda: model.load_tokenizer(ModelConfig(name_or_path="someone/not-a-real-model-xyz")),
                     lambda: sources.load_raw(DataConfig(dataset="someone/not-a-real-dataset-xyz"))):
            try:
                load()
            except LlmkitError as exc:
                print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "could not load the tokenizer 'someone/not-a-real-model-xyz'" in out.stdout
    assert "could not load data.dataset 'someone/not-a-real-dataset-xyz' from the Hub" in out.stdout


def test_tokenizer_without_pad_token_gets_one(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = model.load_tokenizer(ModelConfig(name_or_path=str(tiny_bert), tokenizer=str(tmp_path / "tok")))
    assert loaded.pad_token is not None


def test_model_dtype_and_attention_reach_from_pretrained(tiny_lm):
    import torch

    from llmkit.config import LoraConfig

    cfg = ModelConfig(name_or_path=str(tiny_lm / "model"), dtype="bfloat16", attn_implementation="eager")
    net = model.load_classifier(cfg, ["neg", "pos"], pad_token_id=0, lora=LoraConfig(enabled=False))
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert net.config._attn_implementation == "eager"
    assert type(net).__name__ == "LlamaForSequenceClassification" and net.config.pad_token_id == 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_full_model_trains_every_weight(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig())
    assert type(net).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in net.parameters())


def test_lora_freezes_the_base_and_targets_every_projection(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True, r=4, alpha=8))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == set(lora_module.LORA_TARGETS["llama"])
    total = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for n, p in net.named_parameters() if n in trainable) < 0.5 * total


def test_merged_model_equals_base_plus_adapter(tiny_llama):
    net = model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True, r=4, alpha=8,
                                                                                    dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter something to say
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 64, (2, 12))
    net.eval()
    with torch.no_grad():
        with_adapter = net(input_ids=ids).logits
        merged = net.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter, atol=1e-4)


def test_bad_lora_targets_are_named(tiny_llama):
    with pytest.raises(LlmkitError, match=r"lora.target_modules \['qkv'\] are not modules of this llama model"):
        model.load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)), LoraConfig(enabled=True,
                                                                                   target_modules=["qkv"]))


def test_lora_with_gradient_checkpointing_keeps_a_gradient_path(tiny_llama):
    cfg = ModelConfig(name_or_path=str(tiny_llama), gradient_checkpointing=True)
    net = model.load_causal_lm(cfg, LoraConfig(enabled=True, r=4, alpha=8))
    net.train()
    ids = torch.randint(0, 64, (2, 10))
    net(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in net.named_parameters() if "lora_B" in n]  # A's grad is 0 while B is still 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_4bit_base_keeps_one_dtype_under_zero3(tiny_llama):
    """QLoRA's preparation: peft's upcasts every weight that is not 4-bit to fp32, which ZeRO-3 cannot flatten
    beside 4-bit weights stored in the compute dtype; under ZeRO-3 the base keeps the compute dtype and still
    passes gradients to the adapters. (The 4-bit loading itself needs a GPU; here the base is a bf16 model.)"""
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(enabled=True, r=4, alpha=8, load_in_4bit=True)
    cfg = ModelConfig(name_or_path=str(tiny_llama), gradient_checkpointing=True)
    options = model.loading_options(cfg, lora, "bf16")
    assert options["dtype"] == torch.bfloat16 and options["quantization_config"].bnb_4bit_quant_storage == \
        torch.bfloat16  # the weights that stay unquantized load in the dtype the packed ones are stored in
    dtypes = {}
    for zero3 in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
        with warnings.catch_warnings():  # checkpointing through llmkit's call, not peft's deprecated one (issue 47)
            warnings.filterwarnings("error", message="`gradient_checkpointing_enable` is deprecated")
            prepared = model._for_adapters(base, cfg, lora, zero3=zero3)
        assert getattr(prepared, "is_activation_checkpointing", None) or prepared.is_gradient_checkpointing
        net = model.apply_lora(prepared, lora, task_type="CAUSAL_LM")
        dtypes[zero3] = {p.dtype for n, p in net.named_parameters() if "lora_" not in n}
        net.train()
        net(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        assert all(p.grad is not None for n, p in net.named_parameters() if "lora_" in n), zero3
    assert dtypes[False] == {torch.float32}  # peft's preparation (ZeRO-2, one process): norms and all in fp32
    assert dtypes[True] == {torch.bfloat16}


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_decoder_classifier_finds_the_last_real_token_with_eos_as_pad(tiny_lm, tmp_path, side):
    """A decoder LLM as a sequence classifier scores its last real token. With no pad token of its own the
    tokenizer pads with eos (load_tokenizer), and some tokenizers pad on the left: each row of a padded batch
    must score exactly as it does alone."""
    from transformers import AutoTokenizer

    folder = tmp_path / "no_pad"
    tok = AutoTokenizer.from_pretrained(tiny_lm / "model")
    tok.pad_token = None
    tok.save_pretrained(folder)
    for f in (tiny_lm / "model").iterdir():
        if not (folder / f.name).exists():
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = ModelConfig(name_or_path=str(folder))
    tok = model.load_tokenizer(cfg)
    tok.padding_side = side  # as a tokenizer whose config pads on the left
    assert tok.pad_token == tok.eos_token
    net = model.load_classifier(cfg, ["neg", "pos"], pad_token_id=tok.pad_token_id).eval()
    assert net.config.pad_token_id == tok.eos_token_id
    texts = ["is this film good", "bad", "you are helpful hi"]
    with torch.no_grad():
        batch = net(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = torch.cat([net(**tok([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(batch, alone, atol=1e-5), (side, batch, alone)
