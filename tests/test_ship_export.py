"""llmkit.ship.export without a run: what `output.verify_export: false` still checks before final/ is published."""

import pytest
import torch
from safetensors.torch import save_file

from llmkit.errors import LlmkitError
from llmkit.ship import verify
from llmkit.ship.export import kept_for_inspection


def _weights_only(folder):
    """The check save_classifier / save_causal_lm run through verify.check_export when output.verify_export is
    false, with the export's word that a refused folder stays."""
    return kept_for_inspection(folder, verify.weights_only, folder)


def test_an_unverified_export_is_still_refused_when_a_tensor_is_empty_or_a_file_is_cut(tmp_path):
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(3)}, tmp_path / "model.safetensors")
    assert _weights_only(tmp_path) == {"reloaded": False, "why": "output.verify_export is false"}

    save_file({"w": torch.ones(2, 3), "b": torch.zeros(0)}, tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match=r"1 size-0 tensors \(e.g. b\); refusing to export .* stays in"):
        _weights_only(tmp_path)

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmkitError, match="the export: model.safetensors is cut short.* stays in"):
        _weights_only(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LlmkitError, match="holds no .safetensors weights; nothing to export"):
        _weights_only(tmp_path)


@pytest.mark.slow
def test_the_reload_check_is_an_importable_module_run_in_a_fresh_process(tmp_path, tiny_bert, tiny_lm):
    """verify's two reloads (a classifier; a causal LM's LoRA adapter on its base, merged into a plain model) run
    `python -m llmkit.ship.reload` and reproduce logits computed here."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from llmkit.ship import verify

    texts = ["good film", "a bad film"]
    model, tok = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(
        tiny_bert)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    probe = {"kind": "classification", "precision": "fp32", "texts": texts, "pairs": None, "max_length": 32,
             "logits": logits.tolist()}
    got = verify.check_classifier(tiny_bert, probe)
    assert got["same_predictions"] == 2 and got["max_abs_logit_diff"] < 1e-4

    base = tiny_lm / "model"
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    ids = [[4, 5, 6, 7, 8]]
    with torch.no_grad():
        want = peft(input_ids=torch.tensor(ids)).logits
    probe = {"kind": "causal_lm", "precision": "fp32", "lora": True, "base": str(base), "ids": ids,
             "quantized": None, "logits": want.tolist()}
    checks = verify.check_causal_lm(adapter, probe, merged_out=tmp_path / "merged")
    assert checks["model"] < 1e-4 and checks["merged_vs_adapter"] < 1e-4
    assert (tmp_path / "merged" / "config.json").is_file()  # the merged model, written by the reload process
    with pytest.raises(LlmkitError, match="disagrees with the run"):
        verify.check_causal_lm(adapter, {**probe, "logits": (want + 1.0).tolist()})
