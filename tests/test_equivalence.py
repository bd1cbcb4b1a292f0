"""ZeRO 0-3 are the same optimisation: equal per-step losses and weights; accumulation 2 x B == 1 x 2B; real sharding."""

from __future__ import annotations

import pytest
from conftest import ZERO_RUN_STEPS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = ZERO_RUN_STEPS


@pytest.fixture(scope="module")
def runs(zero_runs):
    """The shared ZeRO 0-3 runs (conftest.zero_runs) with their exported weights."""
    return {name: {**run, "weights": load_file(run["dir"] / "final" / "model.safetensors")}
            for name, run in zero_runs.items()}


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
