"""The optimizer and speed switches (llmkit.train.optim): they change how fast a run goes, never what it
computes: the AdamW kernel, DataLoader workers, torch.compile; the profiler writes what it promises; throughput
counts training steps, not evaluation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import changed, check_ok, launch, write_config
from transformers import BertConfig, BertForSequenceClassification

from llmkit.config import Config
from llmkit.train import optim


def _loss_list(run_dir):
    return [s["train/loss"] for s in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in s]


def _close(a, b, rel):
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y}"


def test_adamw_kernels_take_the_same_steps():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))
    grads = [torch.randn_like(p) for p in base.parameters()]
    results = {}
    for impl in ("fused", "foreach", "loop"):
        model = copy.deepcopy(base)
        cfg = Config()
        cfg = changed(cfg, {"train.adamw_impl": impl})
        opt = optim.build_optimizer(cfg, model)
        group = opt.param_groups[0]
        assert (bool(group["fused"]), bool(group["foreach"])) == {"fused": (True, False), "foreach": (False, True),
                                                                  "loop": (False, False)}[impl]
        assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]
        for _ in range(3):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        results[impl] = [p.detach() for p in model.parameters()]
    for impl in ("foreach", "loop"):
        for a, b in zip(results["fused"], results[impl]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(results["fused"], base.parameters()))  # they did move


@pytest.mark.slow
def test_switches_keep_a_two_rank_run_identical(tmp_path, tiny_bert_no_dropout, tiny_data):
    """ZeRO-2 on 2 ranks: the old foreach AdamW in-process loading vs the fused default with 2 DataLoader
    workers per rank and the profiler on: the same loss at every step; the profile of each rank is written."""
    runs = {}
    for name, extra in (("baseline", ["--train.adamw_impl", "foreach"]),
                        ("switched", ["--train.dataloader_workers", "2", "--train.profile_steps", "2"])):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_bert_no_dropout, tiny_data, out, max_steps=8,
                           logging_steps=1, eval_every_steps=4, learning_rate=2e-3)
        check_ok(launch("recipes/classification.py", ["--config", str(cfg), *extra]))
        runs[name] = out
    _close(_loss_list(runs["switched"]), _loss_list(runs["baseline"]), rel=1e-5)

    for rank in (0, 1):
        ops = (runs["switched"] / "profile" / f"rank{rank}_ops.txt").read_text()
        for label in ("llmkit/forward", "llmkit/backward", "llmkit/optimizer", "aten::addmm"):
            assert label in ops, (rank, label)
        trace = json.loads((runs["switched"] / "profile" / f"rank{rank}_trace.json").read_text())
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
        assert len(steps) == 2, steps  # the 2 profiled steps, after the warm-up ones
        phases = json.loads((runs["switched"] / "profile" / f"rank{rank}_phases.json").read_text())
        assert phases["steps"] == 2 and phases["step_ms"] > 0
        parts = [phases[f"{p}_ms"] for p in ("forward", "backward", "optimizer")]
        assert all(x > 0 for x in parts) and sum(parts) <= phases["step_ms"]
        assert 0 < phases["gemm_ms"] < phases["forward_ms"] + phases["backward_ms"]
        assert phases["collectives_ms"] > 0  # ZeRO-2 on 2 ranks reduces gradients every step
    assert not (runs["baseline"] / "profile").exists()

    # throughput counts the time in training steps: the evaluations at steps 4 and 8 are not in it
    train = json.loads((runs["switched"] / "metrics.json").read_text())["train"]
    assert 0 < train["step_seconds"] < train["train_seconds"]
    assert train["samples_per_second"] == pytest.approx(8 * 8 * 2 / train["step_seconds"], rel=0.02)


@pytest.mark.slow
def test_torch_compile_switch_compiles_the_blocks_and_computes_the_same(tmp_path, tiny_bert_no_dropout, tiny_data):
    runs = {}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_bert_no_dropout, tiny_data, out, max_steps=4,
                           logging_steps=1, verify_export=name == "compiled")
        proc = launch("recipes/classification.py", ["--config", str(cfg), "--train.torch_compile", compile_,
                                                    "--data.max_eval_samples", "8", "--data.test_split", "null"],
                      accelerate_config=None, num_processes=1)
        check_ok(proc)
        runs[name] = (out, proc.stdout + proc.stderr)
    assert "torch.compile: 2 transformer blocks" in runs["compiled"][1]
    assert "torch.compile:" not in runs["eager"][1]  # llmkit's line, not a library's warning naming torch.compile
    _close(_loss_list(runs["compiled"][0]), _loss_list(runs["eager"][0]), rel=1e-4)
    # parameter names are untouched by compiling in place: the export reloads with plain transformers
    reloaded = BertForSequenceClassification.from_pretrained(runs["compiled"][0] / "final")
    assert reloaded.config.num_hidden_layers == 2
    check = json.loads((runs["compiled"][0] / "metrics.json").read_text())["export_check"]
    assert check["same_predictions"] == check["rows"]
