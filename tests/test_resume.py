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


def _rows_by_step(folder) -> dict[int, list[int]]:
    """LLMKIT_TRACE_ROWS output: step -> the sorted checksums of every row trained on in it, all ranks."""
    steps: dict[int, list[int]] = {}
    for file in folder.glob("rows_rank*.jsonl"):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).extend(entry["rows"])
    return {k: sorted(v) for k, v in steps.items()}


# fp32, no dropout: after the resume only the order of the sums changes (a step's 2 micro-batches are summed by
# the all-reduce on 2 ranks, by accumulation on 1), which moves the loss by float32 rounding: a few 1e-7
# relative per step, compounded through Adam over 4 steps. 1e-5 relative is 10-100x that and far below what a
# wrong row, a lost optimizer state (the loss jumps back up) or a stale learning rate would change.
ELASTIC_RTOL = 1e-5


@pytest.mark.parametrize(("stage", "saved", "ranks"), [(2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2), (1, 2, 1),
                                                     (0, 2, 1)])
def test_an_elastic_resume_trains_on_the_rows_a_straight_run_would(tmp_path, tiny_bert_no_dropout, tiny_data, stage,
                                                                  saved, ranks):
    """A mid-epoch checkpoint written by `saved` ranks resumed on `ranks`: the global batch is kept (accumulation
    2 // ranks), each step after the resume trains on the straight run's rows, the losses follow it, the export
    reloads; a second resume reuses the converted checkpoint; with checkpoint.new_global_batch the checkpoint's
    order of rows continues, fewer to a step."""
    acc_cfg = f"cpu_zero{stage}.yaml"

    def run(name, n, *extra):
        trace = tmp_path / f"{name}-rows"
        trace.mkdir()
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_bert_no_dropout, tiny_data, out, max_steps=TOTAL,
                           logging_steps=1, gradient_accumulation_steps=2 // saved)
        proc = launch("recipes/classification.py", ["--config", str(cfg), *extra], acc_cfg, num_processes=n,
                      env={"LLMKIT_TRACE_ROWS": str(trace)})
        check_ok(proc)
        return proc, out, trace

    _, s_out, s_rows = run("straight", saved, "--checkpoint.save_every_steps", str(AT))
    ckpt = s_out / "checkpoints" / f"step-{AT}"
    assert json.loads((ckpt / checkpoint.STATE).read_text())["batches_in_epoch"] == AT * (2 // saved) % (12 // saved)
    proc, r_out, r_rows = run("resumed", ranks, "--checkpoint.resume_from", str(ckpt))
    said = proc.stdout + proc.stderr
    assert f"elastic resume: written by {saved} rank(s), continued on {ranks}" in said
    assert f"gradient accumulation {2 // saved} -> {2 // ranks}" in said
    assert ("converted" in said and (ckpt / "universal" / rundir.MANIFEST).is_file()) == (stage > 0)
    assert "RNG streams re-seeded" in said
    straight, resumed = _rows_by_step(s_rows), _rows_by_step(r_rows)
    assert sorted(resumed) == list(range(AT + 1, TOTAL + 1))
    for step in resumed:  # the same rows, step by step (checksums of their real tokens)
        assert resumed[step] == straight[step], step
    a, b = _losses(s_out), _losses(r_out)
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in b)
    print(f"elastic ZeRO-{stage} {saved}->{ranks}: worst relative loss difference {worst:.2e}")
    assert worst <= ELASTIC_RTOL, (a, b)
    summary = json.loads((r_out / "metrics.json").read_text())["train"]
    assert summary["elastic_resume"]["saved_world"] == saved and summary["world_size"] == ranks
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(r_out / "final")  # plain transformers reloads it
    wa, wb = load_file(s_out / "final/model.safetensors"), load_file(r_out / "final/model.safetensors")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-6), key
    if (stage, saved) == (2, 2):  # a second resume from that checkpoint reuses the universal copy
        again, _, _ = run("again", ranks, "--checkpoint.resume_from", str(ckpt))
        assert f"reusing the universal checkpoint {ckpt / 'universal'}" in again.stdout + again.stderr
    if stage == 1:  # the same checkpoint on 1 rank with accumulation 1: half the global batch, asked for
        proc, n_out, n_rows = run("new-batch", 1, "--checkpoint.resume_from", str(ckpt),
                                  "--train.gradient_accumulation_steps", "1", "--checkpoint.new_global_batch", "true")
        said = proc.stdout + proc.stderr
        assert "NEW global batch (checkpoint.new_global_batch): 16 -> 8 rows per step" in said, said[-3000:]
        assert "reusing the universal checkpoint" in said
        # the 4 micro-batches left in epoch 0 (12 in all, 8 consumed) are the straight run's steps 5-6 and here
        # steps 5-8, one each: the same rows, in the checkpoint's order
        resumed = _rows_by_step(n_rows)
        assert sorted(resumed) == list(range(AT + 1, TOTAL + 1))
        assert sorted(sum(resumed.values(), [])) == sorted(straight[AT + 1] + straight[AT + 2])
        record = json.loads((n_out / "metrics.json").read_text())["train"]["elastic_resume"]
        assert record["new_global_batch"] and (record["saved_global_batch"], record["global_batch"]) == (16, 8)
        AutoModelForSequenceClassification.from_pretrained(n_out / "final")


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
                   "cpu_zero2.yaml", num_processes=3)
    assert ranks.returncode != 0  # 2 micro-batches per step do not split among 3 ranks
    assert "3 ranks cannot split that evenly" in ranks.stderr and "Resume on 1, 2 rank(s)" in ranks.stderr


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
