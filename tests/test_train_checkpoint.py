"""Checkpoints (llmkit.rundir.checkpoints, llmkit.rundir.manifest): pruning, pointer fallback, manifests, the weights-only gate, RNG round
trip; with real 2-rank runs, exact resume (straight vs stop + resume), kill -9 and a write error while saving,
SIGTERM, damaged and foreign checkpoints, a stream resumed at its row."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, check_ok, faulty_run, launch, losses_of, write_config
from safetensors.torch import load_file

from llmkit import memory
from llmkit.commands.validate import validate
from llmkit.errors import LlmkitError
from llmkit.rundir import checkpoints, manifest
from llmkit.rundir.layout import RunDir


def _fake(root, step, files=None):
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x" * step)
    files = files or {"weights.bin": step}
    (path / manifest.MANIFEST).write_text(json.dumps({"step": step, "files": files, "fingerprint": {}}))
    return path


def test_keep_last_and_keep_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        _fake(root, step)
    state = checkpoints.TrainerState(step=10, history=[
        {"step": 4, "score": 0.91, "checkpoint": "step-4"},
        {"step": 6, "score": 0.80, "checkpoint": "step-6"},
        {"step": 8, "score": 0.85, "checkpoint": "step-8"},
    ])
    checkpoints._prune(root, keep_last=2, keep_best=1, state=state)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-10", "step-4", "step-8"]
    checkpoints._prune(root, keep_last=1, keep_best=0, state=state)
    assert [p.name for p in root.glob("step-*")] == ["step-10"]


def test_latest_falls_back_past_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root, 2)
    (root / "step-4").mkdir()  # no manifest: was being written
    (root / "latest").write_text("step-4\n")
    assert checkpoints.resolve(RunDir(tmp_path), "latest").path == root / "step-2"
    with pytest.raises(LlmkitError, match="step-4 is incomplete"):
        checkpoints.resolve(RunDir(tmp_path), str(root / "step-4"))
    with pytest.raises(LlmkitError, match="holds no usable checkpoint"):
        checkpoints.resolve(RunDir(tmp_path / "elsewhere"), "latest")


def test_missing_file_is_reported(tmp_path):
    path = _fake(tmp_path, 3, files={"weights.bin": 3, "optimizer.pt": 10})
    with pytest.raises(LlmkitError, match="is damaged: optimizer.pt is missing"):
        manifest.verify(path)


def test_rng_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoints._rng_state()))  # it must survive JSON
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoints.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


class _Payload:
    """Stands for a pickle that would run code when loaded (its class is not on the allowlist)."""

    def __init__(self):
        self.command = "echo pwned"


def test_checkpoint_files_must_pass_the_weights_only_gate(tmp_path):
    import torch

    from llmkit.rundir.checkpoints import check_pickles

    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "fine.pt")
    check_pickles(tmp_path)  # tensors and plain data pass
    torch.save({"state": _Payload()}, tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(LlmkitError, match="checkpoint file custom_checkpoint_0.pkl holds more than tensors and "
                                          "plain data .*_Payload.*unpickling it could run code"):
        check_pickles(tmp_path)


def test_a_users_copy_a_torn_manifest_and_same_size_damage(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _fake(root, step)
    backup = root / "step-2.bak"
    backup.mkdir()  # a user's copy is not a checkpoint: neither resume nor pruning trips over it
    checkpoints._prune(root, keep_last=1, keep_best=0, state=checkpoints.TrainerState(step=4))
    assert sorted(p.name for p in root.iterdir()) == ["step-2.bak", "step-4"] and backup.is_dir()
    _fake(root, 6)
    (root / "step-6" / manifest.MANIFEST).write_text('{"step": 6, "fil')  # torn: the write was cut short
    (root / "latest").write_text("step-6\n")
    with pytest.raises(LlmkitError, match="step-6 is damaged: its manifest.json does not parse"):
        manifest.verify(root / "step-6")
    assert checkpoints.resolve(RunDir(tmp_path), "latest").path == root / "step-4"  # falls back past it
    # a small file changed in place, same size: the manifest's sha256 catches it before anything is loaded
    path = root / "step-4"
    (path / checkpoints.STATE).write_text('{"step": 4}')
    files = {"weights.bin": 4, checkpoints.STATE: 11}
    digest = __import__("hashlib").sha256(b'{"step": 4}').hexdigest()
    (path / manifest.MANIFEST).write_text(json.dumps({"step": 4, "files": files, "sha256": {checkpoints.STATE: digest},
                                                        "fingerprint": {}}))
    manifest.verify(path)
    (path / checkpoints.STATE).write_text('{"step": 9}')
    with pytest.raises(LlmkitError, match="trainer_state.json does not match the sha256"):
        manifest.verify(path)


def test_a_corrupted_shard_is_damaged_not_dangerous(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "optim_states.pt")
    data = bytearray((tmp_path / "optim_states.pt").read_bytes())
    data[len(data) // 2:] = b"\0" * (len(data) - len(data) // 2)
    (tmp_path / "optim_states.pt").write_bytes(bytes(data))
    with pytest.raises(LlmkitError, match="is damaged: optim_states.pt cannot be read") as err:
        checkpoints.check_pickles(tmp_path)
    assert "could run code" not in str(err.value)


@pytest.mark.slow
def test_write_error_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_bert, tiny_data):
    out, cfg, proc = faulty_run(tmp_path, tiny_bert, tiny_data, 3, "oserror_in_save@4:1")
    assert ("llmkit: error: writing checkpoint step-4 failed on 1 rank(s); nothing was replaced: the previous "
            "checkpoint (step-2) and export are intact") in proc.stderr
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]  # no step-4, no .tmp left
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    # and it resumes from there
    resumed = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", "latest"],
                     "cpu_zero3.yaml")
    check_ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr


TOTAL, AT = 8, 4  # 6 batches per rank per epoch: step 4 is in the middle of the first epoch


def _dynamics(out, accumulation: int = 1) -> np.ndarray:
    """A run's training dynamics, each training row once per epoch: all 96 rows of each whole epoch (6 batches of
    8 per rank), 16 x accumulation rows a step of the last one; sorted by epoch and row to compare runs."""
    records = np.load(out / "training_dynamics.npy")
    per_epoch = 6 // accumulation  # optimizer steps an epoch
    for epoch in range(-(-TOTAL // per_epoch)):
        rows = records[records["epoch"] == epoch]["row"].tolist()
        steps = min(per_epoch, TOTAL - epoch * per_epoch)
        assert len(rows) == len(set(rows)) == (96 if steps == per_epoch else 16 * accumulation * steps), epoch
        assert steps < per_epoch or sorted(rows) == list(range(96)), epoch
    assert sorted(set(records["step"].tolist())) == list(range(1, TOTAL + 1))
    return np.sort(records, order=["epoch", "row"])


def _run(tmp_path, name, model, data, accelerate_config, extra=(), env=None, **train):
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", model, data, out, max_steps=TOTAL, logging_steps=1, **train)
    proc = launch("recipes/classification.py", ["--config", str(cfg), *extra], accelerate_config, env=env)
    return proc, out, cfg


SAVED = ["--checkpoint.save_every_steps", str(AT), "--checkpoint.keep_last", "3"]  # step-4 and step-8 kept


@pytest.fixture(scope="module")
def straight_zero2(tmp_path_factory, tiny_bert, tiny_data):
    """One straight ZeRO-2 fp32 run of TOTAL steps that checkpoints at AT and TOTAL: the reference of the SIGTERM
    test (a save changes no later number: the resumed run compares bit for bit against a run that saved), and the
    checkpoints the damaged-checkpoint test copies. (proc, run folder, config)."""
    proc, out, cfg = _run(tmp_path_factory.mktemp("straight_zero2"), "straight", tiny_bert, tiny_data,
                          "cpu_zero2.yaml", SAVED)
    check_ok(proc)
    return proc, out, cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "precision", "accumulation"),
    [(0, "fp32", 1), (3, "fp32", 2), (2, "bf16", 1)],  # ZeRO-3 with accumulation: both in one
)
def test_resume_continues_exactly(tmp_path, tiny_bert, tiny_data, stage, precision, accumulation):
    """A mid-epoch checkpoint resumed: the same losses, training dynamics and weights as the straight run (ZeRO-2
    fp32: test_sigterm_checkpoints_and_resume_continues_the_sequence, against the shared straight run)."""
    acc_cfg = f"cpu_zero{stage}.yaml"
    straight, s_out, _ = _run(tmp_path, "straight", tiny_bert, tiny_data, acc_cfg, SAVED, precision=precision,
                              gradient_accumulation_steps=accumulation)
    check_ok(straight)
    ckpt = s_out / "checkpoints" / f"step-{AT}"
    assert (ckpt / manifest.MANIFEST).is_file()
    state = json.loads((ckpt / checkpoints.STATE).read_text())
    assert state["step"] == AT and state["batches_in_epoch"] == AT * accumulation % 6  # mid-epoch position

    resumed, r_out, _ = _run(tmp_path, "resumed", tiny_bert, tiny_data, acc_cfg,
                             ["--checkpoint.resume_from", str(ckpt)], precision=precision,
                             gradient_accumulation_steps=accumulation)
    check_ok(resumed)
    assert f"resumed from {ckpt}: step {AT}" in resumed.stdout + resumed.stderr
    a, b = losses_of(s_out), losses_of(r_out)
    assert sorted(b) == list(range(AT + 1, TOTAL + 1))
    for step in b:
        if precision == "fp32":
            assert b[step] == a[step], f"step {step}: {b[step]} != {a[step]}"  # bitwise
        else:
            assert abs(b[step] - a[step]) <= 1e-3 * abs(a[step]), step
    # output.verify_export false (helpers.write_config): no fresh-process reload, the weights checked and published
    assert json.loads((r_out / "metrics.json").read_text())["export_check"] == {
        "reloaded": False, "why": "output.verify_export is false"}
    assert "reloading it with plain transformers" not in resumed.stdout + resumed.stderr
    # the training dynamics: the checkpoint's copy (steps 1-4) and the resumed steps are the straight run's
    da, db = _dynamics(s_out, accumulation), _dynamics(r_out, accumulation)
    assert np.array_equal(da[["row", "epoch", "step", "label"]], db[["row", "epoch", "step", "label"]])
    if precision == "fp32":
        assert np.array_equal(da, db)  # bitwise, as the losses
    else:
        assert np.allclose(da["margin"], db["margin"], atol=5e-2)
    assert np.array_equal(np.sort(np.load(ckpt / "training_dynamics.npy"), order=["epoch", "row"]), da[da["step"] <= AT])
    wa, wb = load_file(s_out / "final/model.safetensors"), load_file(r_out / "final/model.safetensors")
    for key in wa:
        if precision == "fp32":
            assert torch.equal(wa[key], wb[key]), key
        else:
            assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-2, atol=1e-3), key


@pytest.mark.slow
def test_kill_9_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_bert, tiny_data):
    # rank 1 is SIGKILLed after writing its shards of step 4, before the checkpoint is renamed into place
    proc, out, cfg = _run(tmp_path, "run", tiny_bert, tiny_data, "cpu_zero2.yaml",
                          ["--checkpoint.save_every_steps", "2"], env={"LLMKIT_FAULT": "kill_in_save@4:1"})
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-2"
    assert manifest.verify(root / "step-2")["step"] == 2
    assert not (root / "step-4").exists() and (root / ".tmp-step-4").exists()  # the partial one is not a checkpoint
    resumed = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", "latest"])
    check_ok(resumed)
    assert f"resumed from {root / 'step-2'}: step 2" in resumed.stdout + resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == TOTAL
    # steps 3 and 4 were logged before the kill and again after the resume: metrics.jsonl holds them once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == list(range(1, TOTAL + 1)), steps
    # so do the training dynamics: steps 3 and 4 were written before the kill, then again; each row is there once
    _dynamics(out)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_the_sequence(tmp_path, tiny_bert, tiny_data, straight_zero2):
    _, s_out, _ = straight_zero2
    # a real SIGTERM delivered to rank 1 after step 3: every rank finishes the step and the checkpoint is written
    proc, out, cfg = _run(tmp_path, "stopped", tiny_bert, tiny_data, "cpu_zero2.yaml",
                          env={"LLMKIT_FAULT": "sigterm@3:1"})
    assert proc.returncode != 0
    # once from rank 0 (the launcher's failure summary names it again, as its "traceback :")
    said = proc.stderr.count("llmkit: error: stopped by") - proc.stderr.count("traceback : llmkit: error: stopped by")
    assert said == 1, proc.stderr[-3000:]
    assert "--checkpoint.resume_from latest" in proc.stderr
    ckpt = out / "checkpoints" / "step-3"
    assert manifest.verify(ckpt)["step"] == 3
    straight = _dynamics(s_out)  # the checkpoint's copy of the training dynamics: the straight run's steps 1-3
    assert np.array_equal(np.sort(np.load(ckpt / "training_dynamics.npy"), order=["epoch", "row"]),
                          straight[straight["step"] <= 3])
    resumed = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", "latest"])
    check_ok(resumed)
    assert f"resumed from {ckpt}: step 3" in resumed.stdout + resumed.stderr
    a, b = losses_of(s_out), losses_of(out)
    assert sorted(b) == list(range(1, TOTAL + 1))  # steps 1-3 from the first part, 4-8 after the resume
    assert all(a[s] == b[s] for s in a), (a, b)
    assert np.array_equal(straight, _dynamics(out))  # the stopped and resumed run's rows, bit for bit
    wa, wb = load_file(s_out / "final/model.safetensors"), load_file(out / "final/model.safetensors")
    assert all(torch.equal(wa[key], wb[key]) for key in wa)  # and its weights
    # output.verify_export false (helpers.write_config): no fresh-process reload, the weights checked and published
    assert json.loads((out / "metrics.json").read_text())["export_check"] == {
        "reloaded": False, "why": "output.verify_export is false"}


@pytest.mark.slow
def test_damaged_and_foreign_checkpoints_are_refused(tmp_path, tiny_bert, straight_zero2):
    _, shared, cfg = straight_zero2
    # the preflight's disk check counts what ZeRO saves: 12 bytes a trained weight in the optimizer files in fp32
    # too (the fp32 partition, Adam's m and v; pickling adds a little)
    params = sum(t.numel() for t in load_file(shared / "final/model.safetensors").values())
    optimizer = sum(p.stat().st_size for p in (shared / "checkpoints" / "step-4").rglob("*optim_states.pt"))
    assert memory.checkpoint_bytes(params, "fp32", params) - 4 * params == 12 * params <= optimizer < 13 * params
    out = tmp_path / "run"
    shutil.copytree(shared, out)  # a copy to damage: the shared run's checkpoints stay whole
    root = out / "checkpoints"
    good, bad = root / "step-4", root / "step-8"
    shard = max((p for p in bad.rglob("*") if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate the biggest shard
    with pytest.raises(LlmkitError, match=r"is damaged: .* has \d+ bytes, the manifest says \d+ \(truncated"):
        manifest.verify(bad)
    # `latest` points at the damaged one; resume falls back to the newest good one
    assert checkpoints.resolve(RunDir(out), "latest").path == good

    # another model, or a world size the batch does not split into: refused by the preflight every launch runs
    # before any process group (a launched preflight refusal: test_rundir), here in process
    other = tmp_path / "other_model"
    shutil.copytree(tiny_bert, other)
    with pytest.raises(LlmkitError) as foreign:
        validate(str(cfg), ["--model.name_or_path", str(other), "--checkpoint.resume_from", str(good),
                            "--output.output_dir", str(tmp_path / "new")],
                 str(ROOT / "accelerate_configs" / "cpu_zero2.yaml"), log=lambda line: None)
    assert f"checkpoint {good} belongs to a different run (model: checkpoint '{tiny_bert}' vs now '{other}')" \
        in str(foreign.value)
    three = tmp_path / "three_ranks.yaml"
    three.write_text((ROOT / "accelerate_configs" / "cpu_zero2.yaml").read_text().replace(
        "num_processes: 2", "num_processes: 3"))
    assert "num_processes: 3" in three.read_text()
    with pytest.raises(LlmkitError) as ranks:  # 2 micro-batches per step do not split among 3 ranks
        validate(str(cfg), ["--checkpoint.resume_from", str(good), "--output.output_dir", str(tmp_path / "new1")],
                 str(three), log=lambda line: None)
    assert "3 ranks cannot split that evenly" in str(ranks.value) and "Resume on 1, 2 rank(s)" in str(ranks.value)


@pytest.mark.slow
def test_a_streamed_run_resumes_at_the_exact_row(tmp_path, tiny_lm):
    """data.streaming on 2 ranks, ZeRO-2, fp32: each rank reads its share of the stream; resumed from step 2
    (mid-pass), the run gives the straight run's losses and weights bit for bit, through the end of the pass and
    the start of the next. The rows are all different, so a replayed or skipped row would change the losses."""
    import random

    import yaml
    from helpers import LM_WORDS, write_jsonl, write_lm_config

    words = LM_WORDS[5:]
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": " ".join(random.Random(i).choices(words, k=2 + i % 4)), "response": words[i % len(words)]}
            for i in range(20)]  # 10 rows per rank: 3 batches of 4 per pass (the last one short)
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:4])
    outs = {}
    for name, extra in (("straight", ["--checkpoint.save_every_steps", "2"]), ("resumed", None)):
        out = tmp_path / name
        cfg = write_lm_config(tmp_path / f"{name}.yaml", tiny_lm, out, lora=False, max_steps=5, logging_steps=1)
        raw = yaml.safe_load(cfg.read_text())
        raw["data"].update(dataset=str(data), streaming=True)
        cfg.write_text(yaml.safe_dump(raw))
        if extra is None:
            ckpt = outs["straight"] / "checkpoints" / "step-2"
            extra = ["--checkpoint.resume_from", str(ckpt)]
        proc = launch("recipes/causal_lm.py", ["--config", str(cfg), *extra])
        check_ok(proc)
        outs[name] = out
    said = proc.stdout + proc.stderr
    assert f"resumed from {ckpt}: step 2" in said and "train: streamed, 5 steps" in said
    saved = [json.loads((ckpt / f"rng_rank{r}.json").read_text())["stream"] for r in (0, 1)]
    assert [s["examples"] for s in saved] == [8, 8]  # 2 of the pass's 3 batches (4 + 4, then 2)
    a, b = losses_of(outs["straight"]), losses_of(outs["resumed"])
    assert sorted(b) == [3, 4, 5] and all(b[s] == a[s] for s in b), (a, b)  # bitwise
    assert len(set(a.values())) == 5  # every step saw other rows
    wa = load_file(outs["straight"] / "final/model.safetensors")
    wb = load_file(outs["resumed"] / "final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
