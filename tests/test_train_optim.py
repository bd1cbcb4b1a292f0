"""The optimizer and speed switches (llmkit.train.optim): they change how fast a run goes, never what it
computes: the AdamW kernel, DataLoader workers, torch.compile; the profiler writes what it promises; throughput
counts training steps, not evaluation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ZERO_RUN_STEPS
from helpers import changed
from transformers import BertConfig, BertForSequenceClassification

from llmkit.config import Config
from llmkit.train import optim


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


def test_a_weight_zero3_loaded_partitioned_keeps_its_weight_decay():
    """ZeRO-3 (zero3_init_flag) loads each weight as an empty 1-D tensor, its shape in ds_shape: the decay groups
    follow ds_shape. Every weight once skipped its decay under ZeRO-3; check-numerics caught it at step 1."""
    model = torch.nn.Linear(4, 3)
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    groups = optim.build_optimizer(Config(), model).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, Config().train.weight_decay), (1, 0.0)]
    assert groups[0]["params"][0] is model.weight


@pytest.mark.slow
def test_switches_keep_a_two_rank_run_identical(zero_runs):
    """ZeRO-1 on 2 ranks with the fused AdamW, 2 DataLoader workers per rank and the profiler on (conftest.SWITCHES):
    a check-numerics run, so every step equals the one-process fp32 reference (foreach and loop AdamW against
    fused: the kernel test above), and test_launch holds it to the ZeRO-0 run; the profile of each rank is written."""
    run = zero_runs["zero1"]
    assert run["verdict"]["passed"], run["verdict"]["summary"]
    for rank in (0, 1):
        ops = (run["dir"] / "profile" / f"rank{rank}_ops.txt").read_text()
        for label in ("llmkit/forward", "llmkit/backward", "llmkit/optimizer", "aten::addmm"):
            assert label in ops, (rank, label)
        trace = json.loads((run["dir"] / "profile" / f"rank{rank}_trace.json").read_text())
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
        assert len(steps) == 2, steps  # the 2 profiled steps, after the warm-up ones
        phases = json.loads((run["dir"] / "profile" / f"rank{rank}_phases.json").read_text())
        assert phases["steps"] == 2 and phases["step_ms"] > 0
        parts = [phases[f"{p}_ms"] for p in ("forward", "backward", "optimizer")]
        assert all(x > 0 for x in parts) and sum(parts) <= phases["step_ms"]
        assert 0 < phases["gemm_ms"] < phases["forward_ms"] + phases["backward_ms"]
        assert phases["collectives_ms"] > 0  # ZeRO-1 on 2 ranks reduces gradients every step

    # throughput counts the time in training steps: the evaluation at each epoch's end is not in it
    train = run["metrics"]["train"]
    assert 0 < train["step_seconds"] < train["train_seconds"]
    rows = ZERO_RUN_STEPS * run["batch"] * 2
    assert train["samples_per_second"] == pytest.approx(rows / train["step_seconds"], rel=0.02)


@pytest.mark.slow
def test_torch_compile_switch_compiles_the_blocks_and_computes_the_same(zero_runs):
    """One process with train.torch_compile: the shared single.yaml run of conftest.zero_runs, a check-numerics run,
    so its every step equals the eager one-process fp32 reference (its verdict: test_check_numerics); the parameter
    names are untouched by compiling in place: the export reloads with plain transformers."""
    run = zero_runs["single_compiled"]
    assert "torch.compile: 2 transformer blocks" in run["log"]
    assert run["verdict"]["passed"], run["verdict"]["summary"]
    reloaded = BertForSequenceClassification.from_pretrained(run["dir"] / "final")
    assert reloaded.config.num_hidden_layers == 2
    check = json.loads((run["dir"] / "metrics.json").read_text())["export_check"]
    assert check["same_predictions"] == check["rows"]
