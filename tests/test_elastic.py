"""Elastic resume (llmkit.rundir.elastic): the batch decision of a resume on another number of ranks, and real 2-rank runs
that resume on 1 (and 1 on 2) training on the rows a straight run would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import changed, check_ok, launch, losses_of, write_config
from safetensors.torch import load_file

from llmkit.errors import LlmkitError
from llmkit.rundir import checkpoints, elastic, manifest
from llmkit.rundir.layout import RunDir

TOTAL, AT = 8, 4  # 6 batches per rank per epoch: step 4 is in the middle of the first epoch


def test_the_batch_decision_of_a_resume(tmp_path):
    """The global batch is kept by the accumulation, refused with the choices, or changed only when asked."""
    ckpt = _saved_by(tmp_path / "a", world=2, accumulation=2)
    saved = checkpoints.resolve(RunDir(tmp_path), str(ckpt)).recorded  # as the preflight reads it
    assert elastic.decide(_cfg(accumulation=2), ckpt, saved, 2) is None  # as written
    cfg = _cfg(accumulation=2)
    plan = elastic.decide(cfg, ckpt, saved, 4)
    assert plan.accumulation == 1 and plan.universal and not plan.new_global_batch
    assert cfg.train.gradient_accumulation_steps == 2  # the config stays as given: the run carries the decision
    assert "global batch kept at 4 micro-batches per step (gradient accumulation 2 -> 1)" in plan.describe()
    with pytest.raises(LlmkitError, match=r"3 ranks cannot split that evenly.*Resume on 1, 2, 4 rank\(s\), or "
                                          r"continue with a global batch of 48 rows .*new_global_batch true"):
        elastic.decide(_cfg(accumulation=2), ckpt, saved, 3)
    cfg = _cfg(accumulation=2, new_global_batch=True)
    plan = elastic.decide(cfg, ckpt, saved, 3)  # asked for: this launch's accumulation, 3 x 2 x 8 rows
    assert plan.new_global_batch and plan.record()["global_batch"] == 48 and plan.record()["saved_global_batch"] == 32
    assert "NEW global batch (checkpoint.new_global_batch): 32 -> 48 rows per step" in plan.describe()
    with pytest.raises(LlmkitError, match="train.gradient_accumulation_steps is 3, but checkpoint .* was trained "
                                          "with 2: a resume keeps the global batch"):
        elastic.decide(_cfg(accumulation=3), ckpt, saved, 2)
    plan = elastic.decide(_cfg(accumulation=3, new_global_batch=True), ckpt, saved, 2)  # same ranks: nothing to convert
    assert plan.new_global_batch and not plan.universal and "on the 2 rank(s) that wrote it" in plan.describe()
    with pytest.raises(LlmkitError, match="leave it at the checkpoint's value"):
        elastic.decide(_cfg(accumulation=4), ckpt, saved, 4)  # neither the saved 2 nor the 1 that keeps the batch
    with pytest.raises(LlmkitError, match="per_device_batch_size 8; a resume keeps its batches of rows"):
        elastic.decide(_cfg(accumulation=2, batch=4, new_global_batch=True), ckpt, saved, 4)
    with pytest.raises(LlmkitError, match="a streamed run resumes on 2 ranks only"):
        elastic.decide(_cfg(accumulation=2, streaming=True, new_global_batch=True), ckpt, saved, 4)
    # the disk the conversion needs: twice the optimizer shards plus the model states, none once it exists
    assert elastic.universal_bytes(ckpt) == 2 * 600 + 100
    (ckpt / elastic.UNIVERSAL).mkdir()
    (ckpt / elastic.UNIVERSAL / manifest.MANIFEST).write_text("{}")
    assert elastic.universal_bytes(ckpt) == 0


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


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "saved", "ranks"), [
    (2, 1, 2), (3, 2, 1), (3, 1, 2), (1, 2, 1), (0, 2, 1)])
# ZeRO-2 2 -> 1 is not a case of its own: ZeRO-1 and ZeRO-2 save the same optimizer partitions (stage_1_and_2.py)
# and convert them by the same universal-checkpoint path, which (1, 2, 1) resumes on 1 rank and (2, 1, 2) on 2
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
    assert json.loads((ckpt / checkpoints.STATE).read_text())["batches_in_epoch"] == AT * (2 // saved) % (12 // saved)
    proc, r_out, r_rows = run("resumed", ranks, "--checkpoint.resume_from", str(ckpt))
    said = proc.stdout + proc.stderr
    assert f"elastic resume: written by {saved} rank(s), continued on {ranks}" in said
    assert f"gradient accumulation {2 // saved} -> {2 // ranks}" in said
    assert ("converted" in said and (ckpt / "universal" / manifest.MANIFEST).is_file()) == (stage > 0)
    assert "RNG streams re-seeded" in said
    straight, resumed = _rows_by_step(s_rows), _rows_by_step(r_rows)
    assert sorted(resumed) == list(range(AT + 1, TOTAL + 1))
    for step in resumed:  # the same rows, step by step (checksums of their real tokens)
        assert resumed[step] == straight[step], step
    a, b = losses_of(s_out), losses_of(r_out)
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in b)
    print(f"elastic ZeRO-{stage} {saved}->{ranks}: worst relative loss difference {worst:.2e}")
    assert worst <= ELASTIC_RTOL, (a, b)
    # the training dynamics continue across the change of ranks: each row once an epoch, at the straight run's step
    da, db = (np.sort(np.load(o / "training_dynamics.npy"), order=["epoch", "row"]) for o in (s_out, r_out))
    assert np.array_equal(da[["row", "epoch", "step"]], db[["row", "epoch", "step"]]) and len(da) == 96 + 32
    summary = json.loads((r_out / "metrics.json").read_text())["train"]
    assert summary["elastic_resume"]["saved_world"] == saved and summary["world_size"] == ranks
    # the accumulation the resume trained with is the run's decision, recorded beside the config as given
    info = json.loads((r_out / "run_info.json").read_text())
    assert info["resolved"]["gradient_accumulation_steps"] == 2 // ranks
    assert yaml.safe_load((r_out / "training_config.yaml").read_text())["train"]["gradient_accumulation_steps"] \
        == 2 // saved
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(r_out / "final")  # plain transformers reloads it
    wa, wb = load_file(s_out / "final/model.safetensors"), load_file(r_out / "final/model.safetensors")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-6), key
    if stage == 1:  # the same checkpoint on 1 rank with accumulation 1: half the global batch, asked for
        proc, n_out, n_rows = run("new-batch", 1, "--checkpoint.resume_from", str(ckpt),
                                  "--train.gradient_accumulation_steps", "1", "--checkpoint.new_global_batch", "true")
        said = proc.stdout + proc.stderr
        assert "NEW global batch (checkpoint.new_global_batch): 16 -> 8 rows per step" in said, said[-3000:]
        assert f"reusing the universal checkpoint {ckpt / 'universal'}" in said  # a second resume from it
        # the 4 micro-batches left in epoch 0 (12 in all, 8 consumed) are the straight run's steps 5-6 and here
        # steps 5-8, one each: the same rows, in the checkpoint's order
        resumed = _rows_by_step(n_rows)
        assert sorted(resumed) == list(range(AT + 1, TOTAL + 1))
        assert sorted(sum(resumed.values(), [])) == sorted(straight[AT + 1] + straight[AT + 2])
        record = json.loads((n_out / "metrics.json").read_text())["train"]["elastic_resume"]
        assert record["new_global_batch"] and (record["saved_global_batch"], record["global_batch"]) == (16, 8)
        AutoModelForSequenceClassification.from_pretrained(n_out / "final")


def _saved_by(root, world, accumulation, batch=8, stage=2):
    """A checkpoint folder whose manifest says it was written by `world` ranks x `accumulation`."""
    root.mkdir(parents=True, exist_ok=True)
    engine = root / elastic.DS_TAG
    engine.mkdir(exist_ok=True)
    for rank in range(world):
        (engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    (engine / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    fingerprint = {"world_size": world, "gradient_accumulation_steps": accumulation, "per_device_batch_size": batch,
                   "zero_stage": stage}
    (root / manifest.MANIFEST).write_text(json.dumps({"step": 4, "files": {}, "fingerprint": fingerprint}))
    return root


def _cfg(accumulation=1, batch=8, new_global_batch=False, streaming=False):
    from llmkit.config import Config

    return changed(Config(), {"train.gradient_accumulation_steps": accumulation, "train.per_device_batch_size": batch,
                              "checkpoint.resume_from": "latest", "checkpoint.new_global_batch": new_global_batch,
                              "data.streaming": streaming})
