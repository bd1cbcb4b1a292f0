"""The launch paths (Accelerate + DeepSpeed settings) with real 2-rank runs on CPU: ZeRO 0-3 compute what plain
data parallelism does (losses, weights, real sharding, accumulation 2 x B = 1 x 2B) from one shared run per stage
(conftest.zero_runs, each a `llmkit check-numerics` run: test_check_numerics reads their verdicts); CPU offload,
2 simulated nodes; each export reloads in plain transformers; metrics equal on 1 and 2 ranks; a killed rank ends
the job."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import VERIFIED, ZERO_RUN_ROWS, ZERO_RUN_STEPS
from helpers import (
    LAUNCH_ENV,
    ROOT,
    assert_export_agrees,
    check_ok,
    faulty_run,
    free_ports,
    launch,
    launch_command,
    write_config,
)
from safetensors.torch import load_file
from sklearn import metrics as sk
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow


def _predict(folder, texts):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return model(**enc).logits.argmax(-1).tolist(), model.config.id2label


def _reloaded_predicts_as_the_run(out) -> list[int]:
    """Plain transformers, here, reproduces the run's own test predictions from its export (the check a run with
    output.verify_export makes in a fresh process): the predicted ids."""
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 29 and [r["row"] for r in rows] == list(range(29))
    preds, id2label = _predict(out / "final", [r["text"] for r in rows])
    assert id2label == {0: "neg", 1: "pos"}
    assert [id2label[p] for p in preds] == [r["prediction"] for r in rows]
    return preds


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2_accumulate"])
def test_zero_run_exports_a_model_plain_transformers_reloads(zero_runs, tiny_bert_no_dropout, name):
    run = zero_runs[name]
    out, batch, accumulation = run["dir"], run["batch"], run["accumulation"]
    stage = int(name[4])
    assert f"2 process(es), cpu, precision fp32 (set in the config), DeepSpeed ZeRO-{stage}" in run["log"]

    final = out / "final"
    for file in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "training_config.yaml"):
        assert (final / file).is_file(), file
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == batch * 2 * accumulation and ds["train_micro_batch_size_per_gpu"] == batch
    assert ds["gradient_accumulation_steps"] == accumulation

    # full weights (ZeRO-3 gathered), changed by training
    trained, initial = load_file(final / "model.safetensors"), load_file(tiny_bert_no_dropout / "model.safetensors")
    assert all(t.numel() > 0 for t in trained.values())
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert trained[key].shape == initial[key].shape and not torch.equal(trained[key], initial[key])

    # plain transformers reproduces the run's own test predictions
    preds = _reloaded_predicts_as_the_run(out)
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    gold = [r["label"] for r in rows]
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean([g == ["neg", "pos"][p] for g, p in zip(gold, preds)]))
    if name in VERIFIED:  # the run's own fresh-process reload, where asked
        assert metrics["export_check"]["same_predictions"] == metrics["export_check"]["rows"]
    else:
        assert metrics["export_check"] == {"reloaded": False, "why": "output.verify_export is false"}
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["zero_stage"] == stage
    # every rank's peak memory, and the largest as the run's (what to provision), also in the report
    peaks = metrics["train"]["per_rank"]["peak_memory_bytes"]
    assert len(peaks) == 2 and min(peaks) > 0 and metrics["train"]["peak_memory_bytes"] == max(peaks)
    # ... and by phase: loading (imports, data, model, DeepSpeed) and training, the whole run's peak the larger
    phases = [metrics["train"]["per_rank"][k] for k in ("load_host_peak_bytes", "train_peak_bytes")]
    for rank, (load, train) in enumerate(zip(*phases)):
        assert 0 < load <= peaks[rank] and 0 < train <= peaks[rank] and max(load, train) >= 0.95 * peaks[rank]
    facts = json.loads((out / "report.json").read_text())["runs"][0]["run"]
    assert facts["peak_memory_gib_per_rank"] == [round(b / 2**30, 3) for b in peaks]
    assert facts["peak_memory_gib"] == max(facts["peak_memory_gib_per_rank"])
    # 2 epochs of 80 rows / (batch x 2 ranks) batches per rank, one optimizer step per `accumulation` of them
    assert metrics["train"]["steps"] == 2 * (ZERO_RUN_ROWS // (batch * 2)) // accumulation == ZERO_RUN_STEPS
    # explanations come from a fresh process after the export (the ZeRO-3 run asks for them; the others do not)
    explained = out / "explanations.json"
    assert explained.is_file() == (name == "zero3")
    if name == "zero3":
        assert len(json.loads(explained.read_text())["rows"]) == 8


def test_metrics_identical_on_one_and_two_ranks_with_uneven_eval(tmp_path, tiny_bert, tiny_data):
    results = {}
    for n in (1, 2):
        cfg = write_config(tmp_path / f"c{n}.yaml", tiny_bert, tiny_data, tmp_path / f"out{n}")
        proc = launch("tests/scripts/eval_only.py", [str(cfg), str(tmp_path / f"m{n}.json"),
                                                     "--train.collective_timeout_minutes", "7"], num_processes=n)
        check_ok(proc)
        results[n] = json.loads((tmp_path / f"m{n}.json").read_text())
    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(two["timeouts_s"]) == {7 * 60}  # the config's timeout reached every process group
    # 37 rows in batches of 4 over 2 ranks: the last round is padded by Accelerate and must be dropped again
    for r in (one, two):
        assert sorted(r["row"]) == list(range(37))
    by_row = [dict(zip(r["row"], zip(r["pred"], r["labels"]))) for r in (one, two)]
    assert by_row[0] == by_row[1]
    for key in ("accuracy", "f1", "precision", "recall", "f1_macro", "samples"):
        assert one["metrics"][key] == two["metrics"][key], key
    assert one["metrics"]["loss"] == pytest.approx(two["metrics"]["loss"], rel=1e-5)
    assert one["metrics"]["accuracy"] == pytest.approx(sk.accuracy_score(one["labels"], one["pred"]))
    assert one["metrics"]["f1"] == pytest.approx(sk.f1_score(one["labels"], one["pred"]))


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_job_and_keeps_the_checkpoint(tmp_path, tiny_bert, tiny_data):
    # the launcher and the surviving rank notice and stop: the run ends (no hang until the launch's timeout) and
    # the launcher's summary names the killed rank as the root cause
    out, cfg, proc = faulty_run(tmp_path, tiny_bert, tiny_data, 2, "kill@5:1")
    root = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "rank      : 1 (local_rank: 1)" in root and "Signal 9 (SIGKILL)" in root, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    from llmkit.rundir import manifest

    assert manifest.verify(checkpoints / "step-4")["step"] == 4


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


def _check_export(out, stage: int, offload: str | None = None, verified: bool = True) -> dict:
    ds = json.loads((out / "ds_config.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and "auto" not in json.dumps(ds)
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu"
        if offload == "both":
            assert zero["offload_param"]["device"] == "cpu"
    weights = load_file(out / "final" / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    metrics = json.loads((out / "metrics.json").read_text())
    if verified:  # the run reloaded its export in a fresh process (output.verify_export); else it is reloaded here
        assert_export_agrees(metrics["export_check"])
    else:
        _reloaded_predicts_as_the_run(out)
    assert metrics["train"]["zero_stage"] == stage
    return metrics


@pytest.mark.parametrize(("name", "stage", "offload"), [("zero2_offload", 2, "optimizer"), ("zero3_offload", 3, "both")])
def test_offload_paths_train_and_export(zero_runs, name, stage, offload):
    """CPU offload of the optimizer (ZeRO-2), and of the parameters too (ZeRO-3): the shared runs of
    conftest.zero_runs (their numbers against the one-process reference: test_check_numerics). bf16 with gradient
    checkpointing under ZeRO-3: test_check_numerics too."""
    log = zero_runs[name]["log"]
    assert f"precision fp32 (set in the config), DeepSpeed ZeRO-{stage}" in log
    assert f"ZeRO-{stage}, 2 device(s), fp32" in log  # the memory estimate is logged at start
    metrics = _check_export(zero_runs[name]["dir"], stage, offload, name in VERIFIED)
    assert metrics["train"]["precision"] == "fp32"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plain_zero_stages_train_and_export(zero_runs, stage):
    """ZeRO 0-3 without offload: the shared runs of conftest.zero_runs."""
    log = zero_runs[f"zero{stage}"]["log"]
    assert f"precision fp32 (set in the config), DeepSpeed ZeRO-{stage}" in log
    assert f"ZeRO-{stage}, 2 device(s), fp32" in log  # the memory estimate is logged at start
    metrics = _check_export(zero_runs[f"zero{stage}"]["dir"], stage, verified=f"zero{stage}" in VERIFIED)
    assert metrics["train"]["precision"] == "fp32"
    # the training dynamics under each stage: the same 80 of the 96 rows (data.max_train_samples), once an epoch
    records = np.load(zero_runs[f"zero{stage}"]["dir"] / "training_dynamics.npy")
    first, second = (records[records["epoch"] == e]["row"].tolist() for e in (0, 1))
    assert len(first) == len(set(first)) == ZERO_RUN_ROWS and set(first) == set(second) <= set(range(96))


def test_two_nodes_simulated_on_loopback_zero3(tmp_path, tiny_bert, tiny_data):
    """Two `accelerate launch` processes as two machines (one rank each) on 127.0.0.1, multi-node ZeRO-3 template."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, num_threads=1, verify_export=True)
    port = str(free_ports(1)[0])
    procs = []
    for rank in (0, 1):
        cmd = launch_command("recipes/classification.py", ["--config", str(cfg)], "multinode_zero3.yaml",
                             launcher_args=["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                            "--main_process_ip", "127.0.0.1", "--main_process_port", port])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        check_ok(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "2 process(es), cpu, precision fp32 (set in the config), DeepSpeed ZeRO-3" in "".join(results[0])
    metrics = _check_export(out, 3)
    assert metrics["train"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with dynamic loss scaling needs a GPU")
def test_fp16_trains_on_gpu_with_dynamic_loss_scaling(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, precision="fp16", verify_export=True)
    proc = launch("recipes/classification.py", ["--config", str(cfg)], "zero2.yaml", num_processes=1)
    check_ok(proc)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    _check_export(out, 2)
