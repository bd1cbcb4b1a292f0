"""Exact resume and crash-safe checkpoints, with real 2-rank runs: straight vs stop + resume, kill -9, SIGTERM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import check_ok, launch, write_config
from safetensors.torch import load_file

from llmkit import rundir
from llmkit.errors import LlmkitError
from llmkit.train import checkpoint

pytestmark = pytest.mark.slow

TOTAL, AT = 8, 4  # 6 batches per rank per epoch: step 4 is in the middle of the first epoch


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _run(tmp_path, name, model, data, accelerate_config, extra=(), env=None, **train):
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", model, data, out, max_steps=TOTAL, logging_steps=1, **train)
    proc = launch("recipes/classification.py", ["--config", str(cfg), *extra], accelerate_config, env=env)
    return proc, out, cfg


@pytest.mark.parametrize(
    ("stage", "precision", "accumulation"),
    [(0, "fp32", 1), (2, "fp32", 1), (3, "fp32", 1), (2, "fp32", 2), (2, "bf16", 1)],
)
def test_resume_continues_exactly(tmp_path, tiny_bert, tiny_data, stage, precision, accumulation):
    acc_cfg = f"cpu_zero{stage}.yaml"
    straight, s_out, _ = _run(tmp_path, "straight", tiny_bert, tiny_data, acc_cfg,
                              ["--checkpoint.save_every_steps", str(AT)], precision=precision,
                              gradient_accumulation_steps=accumulation)
    check_ok(straight)
    ckpt = s_out / "checkpoints" / f"step-{AT}"
    assert (ckpt / rundir.MANIFEST).is_file()
    state = json.loads((ckpt / checkpoint.STATE).read_text())
    assert state["step"] == AT and state["batches_in_epoch"] == AT * accumulation % 6  # mid-epoch position

    resumed, r_out, _ = _run(tmp_path, "resumed", tiny_bert, tiny_data, acc_cfg,
                             ["--checkpoint.resume_from", str(ckpt)], precision=precision,
                             gradient_accumulation_steps=accumulation)
    check_ok(resumed)
    assert f"resumed from {ckpt}: step {AT}" in resumed.stdout + resumed.stderr
    a, b = _losses(s_out), _losses(r_out)
    assert sorted(b) == list(range(AT + 1, TOTAL + 1))
    for step in b:
        if precision == "fp32":
            assert b[step] == a[step], f"step {step}: {b[step]} != {a[step]}"  # bitwise
        else:
            assert abs(b[step] - a[step]) <= 1e-3 * abs(a[step]), step
    wa, wb = load_file(s_out / "final/model.safetensors"), load_file(r_out / "final/model.safetensors")
    for key in wa:
        if precision == "fp32":
            assert torch.equal(wa[key], wb[key]), key
        else:
            assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-2, atol=1e-3), key


def test_kill_9_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_bert, tiny_data):
    # rank 1 is SIGKILLed after writing its shards of step 4, before the checkpoint is renamed into place
    proc, out, cfg = _run(tmp_path, "run", tiny_bert, tiny_data, "cpu_zero2.yaml",
                          ["--checkpoint.save_every_steps", "2"], env={"LLMKIT_FAULT": "kill_in_save@4:1"})
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-2"
    assert rundir.verify_checkpoint(root / "step-2")["step"] == 2
    assert not (root / "step-4").exists() and (root / ".tmp-step-4").exists()  # the partial one is not a checkpoint
    resumed = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", "latest"])
    check_ok(resumed)
    assert f"resumed from {root / 'step-2'}: step 2" in resumed.stdout + resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == TOTAL
    # steps 3 and 4 were logged before the kill and again after the resume: metrics.jsonl holds them once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == list(range(1, TOTAL + 1)), steps


def test_sigterm_checkpoints_and_resume_continues_the_sequence(tmp_path, tiny_bert, tiny_data):
    straight, s_out, _ = _run(tmp_path, "straight", tiny_bert, tiny_data, "cpu_zero2.yaml")
    check_ok(straight)
    # a real SIGTERM delivered to rank 1 after step 3: every rank finishes the step and the checkpoint is written
    proc, out, cfg = _run(tmp_path, "stopped", tiny_bert, tiny_data, "cpu_zero2.yaml",
                          env={"LLMKIT_FAULT": "sigterm@3:1"})
    assert proc.returncode != 0
    # once from rank 0 (the launcher's failure summary names it again, as its "traceback :")
    said = proc.stderr.count("llmkit: error: stopped by") - proc.stderr.count("traceback : llmkit: error: stopped by")
    assert said == 1, proc.stderr[-3000:]
    assert "--checkpoint.resume_from latest" in proc.stderr
    assert rundir.verify_checkpoint(out / "checkpoints" / "step-3")["step"] == 3
    resumed = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", "latest"])
    check_ok(resumed)
    a, b = _losses(s_out), _losses(out)
    assert sorted(b) == list(range(1, TOTAL + 1))  # steps 1-3 from the first part, 4-8 after the resume
    assert all(a[s] == b[s] for s in a), (a, b)


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path, tiny_bert, tiny_data):
    proc, out, cfg = _run(tmp_path, "run", tiny_bert, tiny_data, "cpu_zero2.yaml",
                          ["--checkpoint.save_every_steps", "4", "--checkpoint.keep_last", "3"])
    check_ok(proc)
    root = out / "checkpoints"
    good, bad = root / "step-4", root / "step-8"
    shard = max((p for p in bad.rglob("*") if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate the biggest shard
    with pytest.raises(LlmkitError, match=r"is damaged: .* has \d+ bytes, the manifest says \d+ \(truncated"):
        rundir.verify_checkpoint(bad)
    # `latest` points at the damaged one; resume falls back to the newest good one
    assert rundir.resolve_checkpoint(out, "latest") == good

    other = tmp_path / "other_model"
    shutil.copytree(tiny_bert, other)
    foreign = launch("recipes/classification.py", ["--config", str(cfg), "--model.name_or_path", str(other),
                                                   "--checkpoint.resume_from", str(good),
                                                   "--output.output_dir", str(tmp_path / "new")])
    assert foreign.returncode != 0
    assert f"checkpoint {good} belongs to a different run (model: checkpoint '{tiny_bert}' vs now '{other}')" \
        in foreign.stderr
    ranks = launch("recipes/classification.py", ["--config", str(cfg), "--checkpoint.resume_from", str(good),
                                                 "--output.output_dir", str(tmp_path / "new1")],
                   "cpu_zero2.yaml", num_processes=1)
    assert ranks.returncode != 0
    assert "was written by 2 ranks; this run has 1" in ranks.stderr and "ds_to_universal.py" in ranks.stderr


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
    a, b = _losses(outs["straight"]), _losses(outs["resumed"])
    assert sorted(b) == [3, 4, 5] and all(b[s] == a[s] for s in b), (a, b)  # bitwise
    assert len(set(a.values())) == 5  # every step saw other rows
    wa = load_file(outs["straight"] / "final/model.safetensors")
    wb = load_file(outs["resumed"] / "final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
