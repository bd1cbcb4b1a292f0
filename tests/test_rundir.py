"""The run directory has one owner: new / overwrite / resume decided up front, llmkit's files alone moved by an
overwrite, one run at a time (a lock naming its holder), durable records, staging only into folders llmkit made."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import LAUNCH_ENV, ROOT, check_ok, fake_run, free_ports, launch, launch_command, write_config

from llmkit.commands.validate import validate
from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.rundir import layout, life
from llmkit.rundir.layout import RunDir


def _cfg(out: Path, *extra: str):
    return load_config(None, ["--data.dataset", "x", "--output.output_dir", str(out), *extra])


def _intent(out: Path, *extra: str) -> str:
    return life.intent(_cfg(out, *extra), RunDir.of(out))


def test_intent_new_overwrite_resume_and_refusals(tmp_path):
    assert _intent(tmp_path / "fresh") == "new"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "final").mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(LlmkitError, match="holds files llmkit did not write \\(final, thesis.tex\\)"):
        _intent(foreign, "--output.overwrite_output_dir", "true")
    run = fake_run(tmp_path / "run")
    with pytest.raises(LlmkitError, match="already holds files from another run"):
        _intent(run)
    assert _intent(run, "--output.overwrite_output_dir", "true") == "overwrite"
    assert _intent(run, "--checkpoint.resume_from", "latest") == "resume"


def test_overwrite_moves_exactly_the_earlier_runs_files_aside(tmp_path):
    run = fake_run(tmp_path / "run")
    life.begin(RunDir(run), "overwrite", log=lambda m: None)
    assert sorted(p.name for p in run.iterdir()) == sorted([RunDir(run).marker.name, RunDir(run).previous.name, "notes.txt"])
    moved = sorted(p.name for p in RunDir(run).previous.iterdir())
    assert moved == ["checkpoints", "final", "metrics.jsonl", "predictions_test.jsonl", "run_info.json",
                     "training_config.yaml"]
    life.drop_previous(RunDir(run))
    assert not RunDir(run).previous.exists() and (run / "notes.txt").read_text() == "mine"


def test_a_resumed_run_drops_the_rows_it_logs_again(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                                                    for s in (2, 4, 4, 6)))
    assert life.trim_metrics(RunDir(tmp_path), 4) == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4]


HOLD = """
import sys, time
from pathlib import Path
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import RunDir
from llmkit.rundir.life import Lock
try:
    Lock(RunDir(Path(sys.argv[1])))
except LlmkitError as exc:
    print("refused:", exc)
    sys.exit(2)
print("locked", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_one_run_at_a_time_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True, text=True)
        assert second.returncode == 2
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in second.stdout
        with pytest.raises(LlmkitError, match=f"pid {holder.pid}"):
            life.check_free(RunDir(out))  # what preflight asks, before any process group
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next run takes it over
    assert json.loads(RunDir(out).lock.read_text())["pid"] == holder.pid
    again = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "locked" in again.stdout, again.stdout + again.stderr
    assert not RunDir(out).lock.exists()  # released at exit


@pytest.mark.slow
def test_overwrite_over_an_earlier_run_starts_clean_and_resumes_the_new_run(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out)
    saving = ["--checkpoint.save_every_steps", "2", "--checkpoint.keep_last", "2"]
    check_ok(launch("recipes/classification.py", ["--config", str(cfg), "--train.max_steps", "6", *saving]))
    (out / "notes.txt").write_text("mine")
    check_ok(launch("recipes/classification.py", ["--config", str(cfg), "--train.max_steps", "4", *saving,
                                                  "--data.test_split", "null", "--output.overwrite_output_dir",
                                                  "true"]))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-2", "step-4"]
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and steps == sorted(steps)  # only the new run's rows
    assert not (out / "predictions_test.jsonl").exists()  # the new run has no test split
    assert json.loads((out / "report.json").read_text())["runs"][0]["primary_split"] == "validation"
    assert not RunDir(out).previous.exists() and (out / "notes.txt").read_text() == "mine"
    # what a later --checkpoint.resume_from latest would continue: the new run's step 4, not the old one's
    assert json.loads((checkpoints / "step-4" / "trainer_state.json").read_text())["step"] == 4
    assert json.loads((checkpoints / "step-4" / "manifest.json").read_text())["fingerprint"]["data"]["labels"] == \
        ["neg", "pos"]


@pytest.mark.slow
def test_two_launches_on_one_output_dir_one_is_refused(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out)
    procs = []
    for port in free_ports(2):
        cmd = launch_command("recipes/classification.py", ["--config", str(cfg), "--train.max_steps", "12"],
                             launcher_args=["--main_process_port", str(port)])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=LAUNCH_ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(text for code, text in results if code != 0)
    assert "llmkit: error:" in refused and "is in use by another run (pid" in refused, refused[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 12
    assert not RunDir(out).lock.exists()


@pytest.mark.slow
def test_sigterm_to_the_job_after_the_last_step_lets_the_export_finish(tmp_path, tiny_bert, tiny_data):
    """As a scheduler preempts a job: SIGTERM to the launcher's process group while the export is written
    (torch's launcher passes it on to every rank and waits for them); the export, its check and the report
    complete instead of leaving final.tmp behind."""
    out, stamp = tmp_path / "run", tmp_path / "fault_time"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, verify_export=True)
    cmd = launch_command("recipes/classification.py", ["--config", str(cfg), "--train.max_steps", "4"])
    env = {**LAUNCH_ENV, "LLMKIT_FAULT": "stall_export@0:0", "LLMKIT_FAULT_STAMP": str(stamp)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 400
    while not stamp.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert "SIGTERM arrived after the last training step; the run finished its export and report" in stdout, \
        (stdout[-3000:], stderr[-3000:])
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final.tmp").exists()
    assert json.loads((out / "final" / "metrics.json").read_text())["export_check"]["rows"] > 0
    assert (out / "report.html").is_file() and not RunDir(out).lock.exists()


@pytest.mark.slow
def test_resume_after_each_kind_of_change_is_refused_and_the_same_data_elsewhere_is_not(tmp_path, tiny_bert,
                                                                                           tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out)
    check_ok(launch("recipes/classification.py", ["--config", str(cfg), "--train.max_steps", "2",
                                                  "--checkpoint.save_every_steps", "2"]))
    changed = tmp_path / "changed"
    shutil.copytree(tiny_data, changed)
    rows = (changed / "train.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"text": "an entirely different sentence", "label": "pos"})
    (changed / "train.jsonl").write_text("\n".join(rows) + "\n")
    resume = ["--config", str(cfg), "--train.max_steps", "4", "--checkpoint.resume_from", "latest"]
    records = {name: (out / name).read_text() for name in ("training_config.yaml", "run_info.json", "ds_config.json")}
    # what the config tells is refused before any process group, so `llmkit validate` says it too
    for extra, accelerate_config, message in [
        ([], "cpu_zero3.yaml", "(zero_stage: checkpoint 2 vs now 3)"),
        (["--train.precision", "bf16"], "cpu_zero2.yaml", "(precision: checkpoint 'fp32' vs now 'bf16')"),
        (["--train.learning_rate", "0.005"], "cpu_zero2.yaml",
         "other optimizer settings (train.learning_rate: checkpoint 0.001 vs now 0.005)"),
    ]:
        with pytest.raises(LlmkitError, match=re.escape(message)):
            validate(str(cfg), ["--train.max_steps", "4", "--checkpoint.resume_from", "latest", *extra],
                     str(ROOT / "accelerate_configs" / accelerate_config), log=lambda line: None)
    # the rows are known once read: refused by the launched run, before its first step (what the config tells, the
    # ranks refuse by the same preflight.check as `validate` above: not launched again here)
    for extra, message in [(["--data.dataset", str(changed)], "was trained on other data (train changed)"),
                           (["--data.label_names", "[pos, neg]"], "was trained on other data (labels, train changed)")]:
        proc = launch("recipes/classification.py", resume + extra)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr[-3000:])
    # a refused resume wrote nothing: the records still describe the run the checkpoint belongs to
    assert {name: (out / name).read_text() for name in records} == records
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)  # the same rows at another path: the same run
    resumed = launch("recipes/classification.py", resume + ["--data.dataset", str(moved)])
    check_ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr


def test_a_torn_last_line_is_skipped_and_counted_a_damaged_one_named(tmp_path):
    """A run killed mid-write (or a power loss) leaves the last line of metrics.jsonl cut: every reader skips it
    and says how many it skipped; a bad line before the last is damage, named with its line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "train/loss": 1.0}\n{"step": 4, "train/loss": 0.9}\n{"step": 6, "train/lo')
    assert layout.read_jsonl(path) == ([{"step": 2, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9}], 1)
    assert life.trim_metrics(RunDir(tmp_path), 2) == 2  # the step-4 row and the torn one
    assert layout.read_jsonl(path) == ([{"step": 2, "train/loss": 1.0}], 0)
    path.write_text('{"step": 2}\n{"ste\n{"step": 6}\n')
    with pytest.raises(LlmkitError, match="metrics.jsonl line 2 is not JSON"):
        layout.read_jsonl(path)
