"""LoRA sequence classification on 2 real ranks (a tiny Llama scoring its last real token, a tiny BERT), under
ZeRO-2 and ZeRO-3: the export is the merged classifier plus the adapter with its trained head, and both reload
with plain transformers / peft to the run's own predictions. Class weights in the loss, checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import check_ok, launch, write_config, write_jsonl

from llmkit.train import losses

LM_ROWS = [("is this film good", "pos"), ("this film is bad", "neg"), ("you are helpful", "pos"),
           ("is this bad", "neg"), ("this is good", "pos"), ("bad film", "neg")]


def _lm_data(root):
    root.mkdir()
    for split, n in (("train", 48), ("validation", 13)):
        write_jsonl(root / f"{split}.jsonl", [{"text": LM_ROWS[i % 6][0], "label": LM_ROWS[i % 6][1]}
                                              for i in range(n)])
    return root


# both architectures under both stages (each run costs ~28 s on 2 CPU cores); the ZeRO-2 runs weigh classes
@pytest.mark.slow
@pytest.mark.parametrize(("arch", "stage"), [("llama", 3), ("bert", 2), ("llama", 2), ("bert", 3)])
def test_lora_classifier_exports_adapter_with_its_head(tmp_path, tiny_lm, tiny_bert, tiny_data, arch, stage):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, data = (tiny_lm / "model", _lm_data(tmp_path / "data")) if arch == "llama" else (tiny_bert, tiny_data)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", base, data, out, max_steps=4, learning_rate=5e-3)
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    if arch == "llama":
        raw["data"]["test_split"] = None
    if stage == 2:
        raw["train"]["class_weights"] = [1.0, 3.0]
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch("recipes/classification.py", ["--config", str(cfg)], f"cpu_zero{stage}.yaml")
    check_ok(proc)
    final = out / "final"
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    head = "score" if arch == "llama" else "classifier"
    assert adapter["task_type"] == "SEQ_CLS" and head in adapter["modules_to_save"]
    metrics = json.loads((final / "metrics.json").read_text())
    check = metrics["export_check"]
    assert check["same_predictions"] == check["rows"] and check["adapter"]["same_predictions"] == check["rows"]
    # the run's own validation logits (from its probabilities) against both reloads, done here with plain peft
    rows = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()][:6]
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    config = merged.config
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        want = merged(**enc).logits
        got = []
        for seed in (0, 1):  # a head re-initialised on reload would differ between seeds
            torch.manual_seed(seed)
            body = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
                pad_token_id=config.pad_token_id)
            got.append(PeftModel.from_pretrained(body, final / "adapter").eval()(**enc).logits)
    assert torch.allclose(got[0], got[1]) and torch.allclose(got[0], want, atol=1e-4)
    probs = np.array([r["probabilities"] for r in rows])
    assert np.allclose(torch.softmax(want, -1).numpy(), probs, atol=1e-3)
    if stage == 2:  # class weights: logged, and in the summary the card reads
        assert "class weights: neg 1.000, pos 3.000" in proc.stdout + proc.stderr
        assert metrics["train"]["class_weights"] == {"neg": 1.0, "pos": 3.0}


def test_class_weights_weigh_each_row_by_its_class():
    labels = [0, 0, 0, 1]
    weights = losses.class_weights("balanced", labels, ["neg", "pos"])
    assert weights == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])  # n / (classes x count)
    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3], [1.0, -1.0], [0.2, 0.9]])
    target = torch.tensor(labels)
    per_row = -torch.log_softmax(logits, -1)[torch.arange(4), target]
    w = torch.tensor(weights)[target]
    by_hand = float((w * per_row).sum() / w.sum())
    loss = losses.weighted_cross_entropy(weights)(type("Out", (), {"logits": logits})(), {"labels": target})
    assert float(loss) == pytest.approx(by_hand)
    assert float(loss) != pytest.approx(float(per_row.mean()))  # the weights change it
    assert losses.class_weights([1.0, 3.0], labels, ["neg", "pos"]) == [1.0, 3.0]
    assert losses.class_weights(None, labels, ["neg", "pos"]) is None
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match="lists 3 weights but the data has 2 labels"):
        losses.class_weights([1, 2, 3], labels, ["neg", "pos"])
    with pytest.raises(LlmkitError, match="has no row of \\['pos'\\]"):
        losses.class_weights("balanced", [0, 0], ["neg", "pos"])


def test_label_word_class_weights_weigh_each_token_by_its_row(tiny_lm):
    """The label-word loss: all weights 1 is the causal LM's own loss; other weights are the by-hand weighted mean
    of the trained tokens' next-token losses."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_lm / "model").eval()
    torch.manual_seed(0)
    ids = torch.randint(3, net.config.vocab_size, (3, 7))
    labels = torch.full_like(ids, -100)
    labels[0, 4:] = ids[0, 4:]  # row 0 (class 1): 3 trained tokens; row 1 (class 0): 2; row 2 (class 1): 1
    labels[1, 5:] = ids[1, 5:]
    labels[2, 6:] = ids[2, 6:]
    batch = {"input_ids": ids, "labels": labels, "class_ids": torch.tensor([1, 0, 1])}
    with torch.no_grad():
        out = net(input_ids=ids, labels=labels)
        same = losses.weighted_token_loss([1.0, 1.0])(out, batch)
        weighted = losses.weighted_token_loss([1.0, 10.0])(out, batch)
    assert float(same) == pytest.approx(float(out.loss), rel=1e-5)
    logp = torch.log_softmax(out.logits.double(), -1)
    nll = {(r, t): -float(logp[r, t - 1, ids[r, t]]) for r in range(3) for t in range(7) if labels[r, t] >= 0}
    w = {0: 10.0, 1: 1.0, 2: 10.0}
    by_hand = sum(w[r] * v for (r, _), v in nll.items()) / sum(w[r] for r, _ in nll)
    assert float(weighted) == pytest.approx(by_hand, rel=1e-5)
    assert abs(float(weighted) - float(out.loss)) > 1e-3  # the weights change it (a random model: all near ln V)


def test_qlora_is_refused_on_cpu_with_the_reason(tmp_path, tiny_lm):
    """bitsandbytes' CPU backend (0.50) trains a 4-bit model but fails its first no-grad forward after a training
    step (evaluation, export): measured here, so QLoRA is refused before anything starts on a machine without CUDA."""
    import torch

    from llmkit.config import load_config
    from llmkit.errors import LlmkitError
    from llmkit.preflight import check

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA runs (test_qlora_trains_on_a_4bit_base_and_exports)")
    cfg = write_config(tmp_path / "c.yaml", tiny_lm / "model", _lm_data(tmp_path / "data"), tmp_path / "out")
    loaded = load_config(cfg, ["--lora.enabled", "true", "--lora.load_in_4bit", "true", "--data.test_split", "null"])
    with pytest.raises(LlmkitError, match="needs a CUDA GPU: bitsandbytes' CPU backend fails"):
        check(loaded, 1, "classification")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA runs on CUDA GPUs (refused on CPU, tested above)")
@pytest.mark.parametrize(("recipe", "stage"), [("classification", 2), ("causal_lm", 3)])
def test_qlora_trains_on_a_4bit_base_and_exports(tmp_path, tiny_lm, recipe, stage):
    """QLoRA on a GPU: the base loads as 4-bit NF4 (stored in the compute dtype, so ZeRO-3 can partition it),
    LoRA trains on top, the adapter reloads on the same 4-bit base to the run's logits, and the merge into the
    full-precision base is a plain model whose drift is reported."""
    from helpers import write_lm_config

    out = tmp_path / "run"
    if recipe == "classification":
        cfg = write_config(tmp_path / "c.yaml", tiny_lm / "model", _lm_data(tmp_path / "data"), out, max_steps=3)
    else:
        cfg = write_lm_config(tmp_path / "c.yaml", tiny_lm, out, lora=True, max_steps=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "load_in_4bit": True}
    raw["data"]["test_split"] = None
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch(f"recipes/{recipe}.py", ["--config", str(cfg)], f"zero{stage}.yaml",
                  num_processes=torch.cuda.device_count())
    check_ok(proc)
    check = json.loads((out / "final" / "metrics.json").read_text())["export_check"]
    if recipe == "classification":
        assert check["adapter"]["same_predictions"] == check["adapter"]["rows"]
        assert check["merged_from_full_precision_base"] is True
        merged = out / "final"
    else:
        assert check["adapter_on_4bit_base"] < 5e-2 and "merged_relative" in check
        merged = out / "final" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # the merged export needs no bitsandbytes
