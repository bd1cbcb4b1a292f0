"""What every finished causal-LM run of the tiny Llama must show (tests/test_recipe_causal_lm.py, and the ZeRO-3 LoRA
run of tests/test_ship_hub.py, which pushes its adapter as it trains): its report, what a mixture or packing says,
that it learned, an export that reloads with plain transformers (and peft), and a validation loss equal to the one
the export's full logits give in one process."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

RUN_NAME, TAGS = "trk-run", ["sentiment", "tiny"]  # the mixture run's name and tags in every tracker


def as_mixture(cfg_path, tiny_lm, tmp_path) -> None:
    """The run's data as a mixture: its prompt/response rows (weight 2) and the same rows in alpaca form (weight 1)."""
    rows = [json.loads(line) for line in (tiny_lm / "data" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "train.jsonl").write_text("".join(
        json.dumps({"instruction": r["prompt"], "input": "", "output": r["response"]}) + "\n" for r in rows))
    cfg = yaml.safe_load(cfg_path.read_text())
    for key in ("dataset", "prompt_column", "response_column"):
        del cfg["data"][key]
    cfg["data"]["mixture"] = [{"dataset": str(tiny_lm / "data"), "weight": 2.0},
                              {"dataset": str(tmp_path / "alpaca"), "weight": 1.0}]
    cfg_path.write_text(yaml.safe_dump(cfg))


def check_causal_lm_run(proc, cfg, out, tiny_lm, lora: bool, packing: bool = False, mixture: bool = False) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())  # every run ends with its report
    assert report["kind"] == "lm"
    assert report["runs"][0]["scores"]["validation"]["loss"] == metrics["validation"]["loss"]
    if mixture:  # what each source gave, in the log, metrics.json, the report and the card
        mix = metrics["data_mixture"]
        assert [m["weight_share"] for m in mix] == pytest.approx([2 / 3, 1 / 3])
        assert sum(m["examples"] for m in mix) == metrics["train"]["train_examples"]
        assert min(m["examples"] for m in mix) < max(m["available"] for m in mix)  # first_exhausted ended it
        assert report["runs"][0]["data_mixture"] == mix
        first = f"| {mix[0]['source']} | 2 | 66.7% | {mix[0]['examples']} | {mix[0]['available']} |"
        assert first in (out / "report.md").read_text()
        assert "Training data (mixture)" in (out / "report.html").read_text()
        from llmkit.rundir.layout import RunDir
        from llmkit.ship import card

        assert f"{mix[1]['examples']} of {mix[1]['available']}" in card.build(RunDir(out), out / "final", "causal_lm", "me/x")
        assert "mixture source" in proc.stdout + proc.stderr
    if packing:  # every processed token is a real one, and the log says how the rows went in
        assert metrics["train"]["padding_efficiency"] == 1.0
        assert "rows packed padding-free" in proc.stdout + proc.stderr
    history = metrics["train"]["history"]
    assert history[-1]["loss"] < history[0]["loss"] or metrics["validation"]["loss"] < 2.0  # it learned
    assert all(v <= 1e-4 for v in metrics["export_check"].values()), metrics["export_check"]

    from transformers import AutoModelForCausalLM

    final = out / "final"
    if lora:
        from peft import PeftModel

        adapter = load_file(final / "adapter" / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())
        assert all("lora_" in k for k in adapter)
        base = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
        PeftModel.from_pretrained(base, final / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(final / "merged")
        assert (final / "merged" / "chat_template.jinja").is_file() or "chat_template" in \
            (final / "merged" / "tokenizer_config.json").read_text()
    else:
        weights = load_file(final / "model.safetensors")
        assert all(t.numel() > 0 for t in weights.values())
        merged = AutoModelForCausalLM.from_pretrained(final)
    assert type(merged).__name__ == "LlamaForCausalLM"
    validation_loss_is_the_full_logits_one(proc, cfg, packing, merged, metrics["validation"]["loss"])


def validation_loss_is_the_full_logits_one(proc, cfg_path, packing: bool, exported, loss: float) -> None:
    """The run trained and evaluated on the chunked loss (llmkit.model.lm_head, issue 50) on its 2 ranks; its validation
    loss is the one the exported model's full logits give here, in one process."""
    from transformers import AutoTokenizer

    from llmkit.config import load_config
    from llmkit.data import lm
    from llmkit.exported.scoring import token_logprobs

    assert "loss: chunked, 256 scored positions at a time" in proc.stdout + proc.stderr
    cfg = load_config(cfg_path, ["--data.packing", str(packing).lower()])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    rows = lm.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=lambda *_: None).validation
    collate, total, tokens = lm.LMCollator(tokenizer.pad_token_id), 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(rows), 8):
            batch = collate([rows[i] for i in range(lo, min(lo + 8, len(rows)))])
            logp, count = token_logprobs(exported.eval(), {**batch, "targets": batch["labels"]}, chunk=0)
            total, tokens = total - float(logp.sum()), tokens + float(count.sum())
    assert total / tokens == pytest.approx(loss, rel=1e-4)
