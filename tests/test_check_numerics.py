"""`llmkit check-numerics` (llmkit.commands.check_numerics, llmkit.train.numerics / reference / recording /
checked_model): every launcher llmkit ships for a CPU machine passes on its 2 ranks (the shared check-numerics runs
of conftest.zero_runs); the planted faults (llmkit.faults) are caught at their step with the parameters named; bf16
differs from the fp32 reference only within its rounding; GPU configs are refused here; the tolerances as derived."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ZERO_RUN_STEPS, ZERO_RUNS
from helpers import ROOT, assert_export_agrees, check_numerics, write_config

from llmkit.commands import check_numerics as command
from llmkit.config import ModelConfig, load_config
from llmkit.errors import LlmkitError
from llmkit.train import checked_model, numerics, recording, reference


def _cpu_runnable(path) -> bool:
    acc = yaml.safe_load(path.read_text())
    return (acc.get("num_machines") or 1) == 1 and (acc.get("distributed_type", "NO") == "NO" or acc.get("gpu_ids") == "")


def _margins(verdict: dict) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in sorted(verdict["margins"].items()))


def test_the_tolerances_follow_from_the_precision():
    """ε = u_p + √n·u_fp32 per step (u_p = 0 for fp32), τ_k = S·k·ε, τ_w = S·N·ε; Adam's reach lr_k·√k."""
    fp32, bf16 = numerics.tolerances("fp32", 4, 144), numerics.tolerances("bf16", 4, 144)
    assert fp32.per_step == 12 * 2.0**-24 and bf16.per_step == 2.0**-8 + 12 * 2.0**-24
    assert fp32.step(3) == numerics.SAFETY * 3 * fp32.per_step and fp32.parameters == numerics.SAFETY * 4 * fp32.per_step
    assert numerics.SAFETY * math.sqrt(144) * 2.0**-24 <= 1.5 * 144 * 2.0**-24  # about Higham's worst case, n·u
    assert numerics.reach([1e-3, 1e-3], 4) == pytest.approx(2 * (1e-3 + 1e-3 * math.sqrt(2)))
    record = fp32.record()
    assert record["safety"] == numerics.SAFETY and "twin" in record["allowed"]


def test_gpu_configs_are_refused_on_a_cpu_machine_naming_their_cpu_form():
    for path in sorted((ROOT / "accelerate_configs").glob("*.yaml")):
        if _cpu_runnable(path):
            command.runnable_here(path, has_gpu=False)
            continue
        with pytest.raises(LlmkitError) as err:
            command.runnable_here(path, has_gpu=False)
        said = str(err.value)
        if "multinode" in path.name:
            assert "machines; check-numerics launches on one" in said, said
        else:
            assert "runs its ranks on GPUs" in said and "--accelerate-config cpu_zero" in said and "NCCL" in said, said
    with pytest.raises(LlmkitError, match="spans 2 machines"):
        command.runnable_here(ROOT / "accelerate_configs" / "multinode_zero3.yaml", has_gpu=True)
    command.runnable_here(ROOT / "accelerate_configs" / "zero3.yaml", has_gpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine launches zero2.yaml")
def test_the_command_refuses_a_gpu_config_here_with_one_line_and_exit_2(tmp_path, tiny_bert, tiny_data, capsys):
    from llmkit import cli

    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "unused")
    with pytest.raises(SystemExit) as ended:
        cli.main(["check-numerics", "classification", "--config", str(cfg), "--accelerate-config", "zero2",
                  "--output", str(tmp_path / "check")])
    said = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(said) == 1 and said[0].startswith("llmkit: error: --accelerate-config "
                                                                           "zero2.yaml runs its ranks on GPUs")
    assert "--accelerate-config cpu_zero2" in said[0] and not (tmp_path / "check").exists()


def test_the_checked_model_has_no_dropout_and_its_truncated_copy_keeps_the_first_layers(tmp_path, tiny_bert):
    from transformers import BertForSequenceClassification

    spec = ModelConfig(name_or_path=str(tiny_bert))
    whole = checked_model.prepare(spec, tmp_path / "whole", None)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.0
    assert {"hidden_dropout_prob", "attention_probs_dropout_prob"} <= set(whole["dropout_off"])
    assert (tmp_path / "whole" / "model.safetensors").is_symlink() and not whole["truncated"]
    # a budget that holds one layer with the embeddings and head, not two: a truncated copy, said so
    outside, layers = checked_model.parameters_by_layer(tiny_bert)
    per = checked_model.BYTES_PER_PARAMETER
    assert checked_model.layers_that_fit(tiny_bert, (outside + layers[0] + layers[1] // 2) * per) == (1, 2)
    assert checked_model.layers_that_fit(tiny_bert, 1e12) is None
    cut = checked_model.prepare(spec, tmp_path / "cut", 1)
    assert cut["truncated"] and (cut["layers"], cut["of"]) == (1, 2)
    model = BertForSequenceClassification.from_pretrained(tmp_path / "cut")
    names = [n for n, _ in model.named_parameters()]
    assert model.config.num_hidden_layers == 1 and not any("layer.1." in n for n in names)
    meta = {"recipe": "classification", "world_size": 2, "precision": "fp32", "accumulation": 1, "steps": 4}
    assert command.describe(meta, None, cut).endswith("; a truncated copy: its first 1 of 2 layers")  # said so


def _watch(monkeypatch, spec: str, sync: bool = True) -> recording.Watch:
    from llmkit import faults

    monkeypatch.setattr(faults, "SPEC", spec)
    monkeypatch.setattr(faults, "POINT", spec.split("@")[0])
    acc = SimpleNamespace(process_index=1, sync_gradients=sync)
    return recording.Watch(SimpleNamespace(accelerator=acc, cfg=SimpleNamespace(train=SimpleNamespace(max_steps=4))))


def test_the_planted_faults_act_where_they_say(monkeypatch):
    """The numbers the run logs stay as they are; the gradient or the schedule is what the fault changes."""
    w = torch.ones(3, requires_grad=True)
    for spec, sync, step, factor in (("scale_grad@2:1", True, 2, 2.0), ("scale_grad@2:1", True, 1, 1.0),
                                     ("scale_grad@2:0", True, 2, 1.0), ("drop_last_micro@2:*", True, 3, 0.0),
                                     ("drop_last_micro@2:*", False, 3, 1.0)):
        loss = _watch(monkeypatch, spec, sync).loss(step, (w * 2).sum())
        w.grad = None
        loss.backward()
        assert float(loss) == 6.0 and torch.equal(w.grad, torch.full((3,), 2.0 * factor)), (spec, sync, step)
    # lr_ahead@2:*: before step 2's update, the schedule steps once more (once), so step 2 uses step 3's rate
    watch = _watch(monkeypatch, "lr_ahead@2:*")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / 4)
    watch.started(None, sched)
    for step in (1, 2, 3):
        watch.batch(step, {"input_ids": torch.zeros(1, 2)})
        sched.step()
    assert watch.lr == [1.0, 0.5, 0.25]  # 1.0, 0.75, 0.5 without the fault


@pytest.mark.slow
def test_every_shipped_cpu_config_passes(zero_runs):
    """Every launcher llmkit ships for a CPU machine (cpu_zero0-3, single; the offload JSONs; accumulation) passes
    check-numerics on its ranks, the versions and the resolved DeepSpeed config beside the verdict."""
    shipped = {p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml") if _cpu_runnable(p)}
    offload = {p.stem for p in (ROOT / "ds_configs").glob("*offload*.json")}
    assert shipped <= {v[0] for v in ZERO_RUNS.values()} and offload <= {v[1] for v in ZERO_RUNS.values()}
    for name, run in zero_runs.items():
        v = run["verdict"]
        print(f"{name}: {v['checked']}: {_margins(v)} of the tolerances")
        assert run["returncode"] == 0 and v["passed"], v["summary"]
        assert "check-numerics: PASSED" in run["log"] and len(v["steps"]) == ZERO_RUN_STEPS
        assert max(v["margins"].values()) < 0.5, (name, v["margins"])  # clean runs stay well inside
        assert all(v["versions"][p] for p in ("torch", "transformers", "accelerate", "deepspeed", "python"))
        ds = v["deepspeed_config"]
        assert (ds is None) == (name == "single_compiled")
        if ds is not None:
            assert ds["zero_optimization"]["stage"] == int(name[4]) and "auto" not in json.dumps(ds)
        # DeepSpeed computes no gradient norm for ZeRO-0 in fp32 (its basic optimizer): the others are compared
        logged = [s["grad_norm"] is not None for s in v["steps"]]
        assert all(logged) != (name == "zero0"), name


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "accelerate_config", "extra"), [
    ("skip_partition@2:1", "cpu_zero3", []),
    ("scale_grad@2:1", "cpu_zero2", ["--layers", "1"]),
    ("drop_last_micro@2:*", "cpu_zero2", ["--train.gradient_accumulation_steps", "2", "--train.per_device_batch_size",
                                          "4"]),
], ids=["zero3-partition-update-skipped", "one-rank-gradient-scaled", "last-micro-batch-dropped"])
def test_a_planted_fault_is_caught_at_its_step_with_the_parameters_named(tmp_path, tiny_bert, tiny_data, fault,
                                                                           accelerate_config, extra):
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "unused", learning_rate=2e-3)
    proc, v = check_numerics(tmp_path / "check", cfg, accelerate_config, 4, extra, fault=fault)
    assert proc.returncode == command.DIVERGED and v is not None and not v["passed"], proc.stderr[-3000:]
    print(v["summary"])
    assert "check-numerics: DIVERGED" in proc.stdout and "first divergent step 2:" in v["summary"]
    first = v["divergence"]
    assert v["first_divergent_step"] == first["step"] == 2 and first["what"] and first["parameters"]
    assert not any(c["diverged"] for c in (v["steps"][0]["loss"], v["steps"][0]["lr"]))  # step 1 was clean
    assert min(c["ratio"] for c in first["what"]) > 100  # far past its tolerance, not at its edge
    assert v["parameters_diverged"] > 0 and v["parameters"][0]["diverged"]
    said = {c["quantity"] for c in first["what"]}
    if fault.startswith("skip_partition"):  # half of every parameter kept its weights: a smaller step
        assert all(p["run"] < 0.9 * p["reference"] for p in first["parameters"])
    else:  # the gradient itself is another one
        assert "grad_norm" in said
    if "--layers" in extra:  # a truncated copy, said so
        assert v["model"]["truncated"] and "a truncated copy: its first 1 of 2 layers" in v["summary"]
        assert not any("layer.1." in p["name"] for p in v["parameters"])


@pytest.mark.slow
def test_a_learning_rate_schedule_one_step_ahead_is_caught(zero_runs, monkeypatch):
    """lr_ahead@2:* in-process: the ZeRO-2 run's own record replayed with the run's schedule stepped once more
    before step 2 (the fault's code, recording.Watch), held against the reference: step 2 and the parameters."""
    check = zero_runs["zero2"]["check"]
    record = reference.read_record(check / "record")
    cfg = load_config(check / "run" / "training_config.yaml")
    ref = reference.replay(cfg, record)
    faulty = reference.Replay(cfg, record, None)
    watch = _watch(monkeypatch, "lr_ahead@2:*")
    watch.started(faulty.net, faulty.scheduler)
    run = {"loss": {}, "grad_norm": {}, "lr": [], "update_norms": []}
    for k in range(1, ZERO_RUN_STEPS + 1):
        watch.batch(k, {})
        step = faulty.step(k)
        run["loss"][k], run["grad_norm"][k] = step["loss"], step["grad_norm"]
        run["lr"].append(step["lr"])
        run["update_norms"].append({n: float(u.norm()) for n, u in step["updates"].items()})
    tol = numerics.tolerances("fp32", ZERO_RUN_STEPS, 144)
    sizes = {n: w.numel() for n, w in record.initial.items()}
    v = numerics.verdict(numerics.compare_steps(run, ref, tol, sizes),
                         numerics.compare_weights(record.initial, faulty.weights(), ref, record.meta["trainable"], tol),
                         tol)
    print(numerics.summary(v, "ZeRO-2 record, schedule one step ahead"))
    assert not v["passed"] and v["first_divergent_step"] == 2
    assert "lr" in {c["quantity"] for c in v["divergence"]["what"]} and v["divergence"]["parameters"]
    assert v["parameters_diverged"] > 0


@pytest.mark.slow
def test_bf16_differs_from_the_fp32_reference_only_within_its_rounding(tmp_path, tiny_bert, tiny_data):
    """ZeRO-3, bf16, gradient checkpointing on 2 ranks (also the bf16 path's export test): check-numerics passes it,
    and says how far each kind of number stayed from its tolerance; its differences are bf16's own, past what the
    fp32 tolerance would allow."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "unused", learning_rate=2e-3,
                       precision="bf16")
    proc, v = check_numerics(tmp_path / "check", cfg, "cpu_zero3", 6, ["--model.gradient_checkpointing", "true",
                                                                       "--output.verify_export", "true"])
    assert v is not None, proc.stderr[-3000:]
    print(f"bf16 against fp32: {_margins(v)} of the tolerances")
    assert proc.returncode == 0 and v["passed"], v["summary"]
    assert max(v["margins"].values()) < 0.5
    fp32 = numerics.tolerances("fp32", 6, v["tolerances"]["terms"])
    assert max(s["loss"]["relative"] for s in v["steps"]) > fp32.step(6)  # an fp32 tolerance would call it diverged
    log = proc.stdout + proc.stderr
    assert "precision bf16 (set in the config), DeepSpeed ZeRO-3" in log and "ZeRO-3, 2 device(s), bf16" in log
    metrics = json.loads((tmp_path / "check" / "run" / "metrics.json").read_text())
    assert metrics["train"]["precision"] == "bf16" and metrics["train"]["zero_stage"] == 3
    assert_export_agrees(metrics["export_check"])
