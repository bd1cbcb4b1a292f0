"""ZeRO 0-3 are the same optimisation: equal per-step losses and weights; accumulation 2 x B == 1 x 2B; real sharding."""

from __future__ import annotations

import json

import pytest
from helpers import check_ok, launch, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_no_dropout, tiny_data):
    """One 10-step fp32 run per ZeRO stage (batch 8 x 2 ranks), plus ZeRO-2 with batch 4 x accumulation 2."""
    root = tmp_path_factory.mktemp("equivalence")
    # no dropout: the comparison is about the sharded arithmetic, not about random masks
    model_dir = tiny_bert_no_dropout
    variants = {f"zero{s}": (f"cpu_zero{s}.yaml", 8, 1) for s in range(4)}
    variants["zero2_accumulate"] = ("cpu_zero2.yaml", 4, 2)
    out = {}
    for name, (accelerate_config, batch, accumulation) in variants.items():
        run_dir = root / name
        cfg = write_config(root / f"{name}.yaml", model_dir, tiny_data, run_dir, max_steps=STEPS, logging_steps=1,
                           per_device_batch_size=batch, gradient_accumulation_steps=accumulation,
                           learning_rate=2e-3, warmup_ratio=0.1)
        proc = launch("recipes/classification.py", ["--config", str(cfg), "--data.group_by_length", "false"],
                      accelerate_config)
        check_ok(proc)
        scalars = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = {
            "losses": [s["train/loss"] for s in scalars if "train/loss" in s],
            "weights": load_file(run_dir / "final" / "model.safetensors"),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
        }
    return out


def _close_losses(a, b, rel=1e-5):
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y}"


def _close_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()  # same names too: the exports are interchangeable
    for key in a:
        diff = (a[key].float() - b[key].float()).abs().max().item()
        assert diff <= atol, f"{key}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stages_match_plain_data_parallel(runs, stage):
    base, other = runs["zero0"], runs[f"zero{stage}"]
    assert base["losses"][0] != base["losses"][-1]  # it trained
    _close_losses(other["losses"], base["losses"])
    _close_weights(other["weights"], base["weights"])


def test_accumulation_2_by_b_equals_1_by_2b(runs):
    _close_losses(runs["zero2_accumulate"]["losses"], runs["zero2"]["losses"])
    _close_weights(runs["zero2_accumulate"]["weights"], runs["zero2"]["weights"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_states_are_really_sharded(runs, stage):
    full = runs["zero0"]["metrics"]["train"]["per_rank"]
    sharded = runs[f"zero{stage}"]["metrics"]["train"]["per_rank"]
    total = full["optimizer_state_elements"][0]
    assert full["optimizer_state_elements"] == [total, total]  # zero0: every rank holds all of Adam's m and v
    for count in sharded["optimizer_state_elements"]:
        assert abs(count - total / 2) <= 0.01 * total, (count, total)  # half each, up to alignment padding
    params = full["parameter_elements"][0]
    for count in sharded["parameter_elements"]:
        if stage == 3:
            assert abs(count - params / 2) <= 0.01 * params  # ZeRO-3 also shards the parameters
        else:
            assert count == params
