"""Bad input fails early with one clear message (exit 2, no traceback); faults on 2 real ranks stop the run
with the step and a hint and never replace a good checkpoint; security rules of the code base."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import bad_inputs
import pytest
import yaml
from helpers import LAUNCH_ENV, ROOT, check_ok, launch, launch_command, write_config

from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.preflight import check_output_dir_is_safe, warnings


def _validate(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit.cli", "validate", str(cfg), *extra], capture_output=True,
                          text=True, env=LAUNCH_ENV, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_validate_passes_a_good_config_and_lists_every_check(tmp_path, tiny_bert, tiny_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    proc = _validate(cfg, "--accelerate-config", str(ROOT / "accelerate_configs/cpu_zero3.yaml"),
                     "--train.learning_rate", "2e-3")
    assert proc.returncode == 0, proc.stderr
    for line in ("ok  config:", "ok  precision: fp32", "ok  launch: 2 process(es), DeepSpeed ZeRO-3",
                 "ok  model: bert, 64 positions, max_length 32 fits", "ok  output:", "ok  disk:",
                 "ok  memory", "ok  tokenizer:", "ok  data: train 96, validation 37, test 29 rows, labels ['neg', 'pos']",
                 "all checks passed"):
        assert line in proc.stdout, line
    assert not (tmp_path / "out").exists()  # validating writes nothing


@pytest.fixture(scope="module")
def battery_assets(tiny_bert, tiny_data, tiny_lm) -> dict:
    return {"bert": tiny_bert, "data": tiny_data, "lm": tiny_lm}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c.fresh else [])
                                  for c in bad_inputs.CASES], ids=[f"{c.kind}: {c.name}" for c in bad_inputs.CASES])
def test_battery_one_clear_line_exit_2_nothing_changed(tmp_path, battery_assets, case):
    """Each bad input of tests/bad_inputs.py: exit 2, one `llmkit: error:` line naming it, no traceback, no file
    changed; each legitimate one (BOM, CRLF, brackets in a path) passes. bench/bad_inputs.py prints the count."""
    got = bad_inputs.run(case, tmp_path, battery_assets)
    assert bad_inputs.verdict(case, got) is None, (bad_inputs.verdict(case, got), got.stderr[-3000:], got.crash)


# under a launcher: one case met before the process group (the DeepSpeed JSON), one in the data after it
UNDER_LAUNCH = [("--deepspeed.config_file={ds}", "'bf16' in DeepSpeed config"),
                ("--data.text_column=sentence", "split 'train' has no column 'sentence'")]


@pytest.mark.slow
@pytest.mark.parametrize(("arg", "message"), UNDER_LAUNCH, ids=["deepspeed-json", "data"])
def test_llmkit_launch_user_error_is_one_line_and_exit_2(tmp_path, tiny_bert, tiny_data, arg, message):
    """`llmkit launch` is `accelerate launch` whose user errors end as exit 2 and the one llmkit line, with no
    traceback of the launcher or of another rank; the run folder is left so the fixed command runs."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    (tmp_path / "ds.json").write_text('{"bf16": true}')
    cmd = [sys.executable, "-m", "llmkit.cli", "launch", *launch_command("recipes/classification.py", [
        "--config", str(cfg), arg.format(ds=tmp_path / "ds.json")], "cpu_zero2.yaml")[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"llmkit: error: {message}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if (tmp_path / "out").exists():  # a run stopped before its first step: the same folder is "new" again
        from llmkit.config import load_config
        from llmkit.rundir import intent

        assert intent(load_config(cfg)) == "new"


@pytest.mark.slow
def test_accelerate_launch_summary_names_the_llmkit_line(tmp_path, tiny_bert, tiny_data):
    """Under plain `accelerate launch` the launcher always re-raises a child failure (its own traceback, exit 1);
    the root cause in its failure summary is the llmkit line, with the child's exit code 2."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    proc = launch("recipes/classification.py", ["--config", str(cfg), "--data.text_column", "sentence"])
    assert proc.returncode != 0
    root = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "exitcode  : 2" in root, proc.stderr[-3000:]
    assert "traceback : llmkit: error: split 'train' has no column 'sentence'" in root
    assert [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")] == [
        "llmkit: error: split 'train' has no column 'sentence' (columns: ['text', 'label']); set the data.*_column "
        "keys to the right names"]
    assert "[rank1]" not in proc.stderr  # the other rank did not die in a barrier


@pytest.mark.slow
def test_a_bug_still_shows_its_traceback(tmp_path):
    # not a user error: an internal failure must not be hidden behind a one-line message
    code = "from llmkit.cli import guarded\nguarded(lambda: 1 / 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_unsafe_output_dirs_and_remote_code_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where, why in (("/", "the filesystem root"), (str(Path.home()), "your home directory"),
                       (str(tmp_path), "the working directory"), (str(tmp_path.parent), "the working directory")):
        cfg = load_config(None, ["--data.dataset", "x", "--output.output_dir", where])
        with pytest.raises(LlmkitError, match=why):
            check_output_dir_is_safe(cfg)
    cfg = load_config(None, ["--data.dataset", "x", "--model.trust_remote_code", "true", "--model.name_or_path",
                             "someone/model"])
    (line,) = warnings(cfg)
    assert "trust_remote_code is on: Python code from 'someone/model'" in line
    assert warnings(load_config(None, ["--data.dataset", "x"])) == []


def _faulty_run(tmp_path, tiny_bert, tiny_data, stage: int, fault: str, **train):
    """A 2-rank run saving every 2 steps, with LLMKIT_FAULT injected; it must fail. The time the fault fired is
    written to tmp_path/fault_time."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, epochs=2, **train)
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"save_every_steps": 2}
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch("recipes/classification.py", ["--config", str(cfg)], f"cpu_zero{stage}.yaml",
                  env={"LLMKIT_FAULT": fault, "LLMKIT_FAULT_STAMP": str(tmp_path / "fault_time")})
    assert proc.returncode != 0
    return out, cfg, proc


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, tiny_data):
    out, _, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "nan@3:1", logging_steps=10)
    assert ("llmkit: error: the training loss became NaN/inf at step 3: training diverged. The last good "
            "checkpoint is step-2") in proc.stderr
    assert "Traceback" not in proc.stderr.split("llmkit: error:")[0]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    assert json.loads((checkpoints / "step-2" / "manifest.json").read_text())["step"] == 2
    assert not (out / "final").exists()


@pytest.mark.slow
def test_write_error_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_bert, tiny_data):
    out, cfg, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 3, "oserror_in_save@4:1")
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


def test_security_rules_of_the_code_base():
    """No eval/exec/pickle of user content, torch.load only with weights_only=True, weights as safetensors."""
    for path in sorted((ROOT / "llmkit").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    export = (ROOT / "llmkit" / "ship" / "export.py").read_text()
    assert "safe_serialization=False" not in export


@pytest.mark.slow
def test_a_broken_training_row_is_named_even_on_another_rank(tmp_path, tiny_bert, tiny_data):
    # the length-grouped sampler deals row 5 to some rank in the first steps; only that rank fails
    out, _, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "row@5:1")
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert errors, proc.stderr[-3000:]
    assert "reading training row 5 failed: ValueError: a broken row (injected)" in errors[0]
    assert not (out / "final").exists()


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_job_and_keeps_the_checkpoint(tmp_path, tiny_bert, tiny_data):
    # the launcher and the surviving rank notice and stop: the run ends (no hang until the launch's timeout) and
    # the launcher's summary names the killed rank as the root cause
    out, cfg, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "kill@5:1")
    root = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "rank      : 1 (local_rank: 1)" in root and "Signal 9 (SIGKILL)" in root, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    from llmkit import rundir

    assert rundir.verify_checkpoint(checkpoints / "step-4")["step"] == 4


REMOTE_CONFIG = "from transformers import BertConfig\n\n\nclass TinyConfig(BertConfig):\n    model_type = 'tiny-remote'\n"
REMOTE_MODEL = ("from transformers import BertForSequenceClassification\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
                "class TinyForSequenceClassification(BertForSequenceClassification):\n    config_class = TinyConfig\n")


@pytest.mark.slow
def test_a_trust_remote_code_model_trains_exports_and_evaluates(tmp_path, tiny_bert, tiny_data):
    """A model whose code lives in its folder (auto_map): the flag reaches the export's reload check and
    `llmkit eval` of the export, not only the training."""
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in tiny_bert.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    (remote / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (remote / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="tiny-remote", architectures=["TinyForSequenceClassification"], auto_map={
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForSequenceClassification": "modeling_tiny.TinyForSequenceClassification"})
    (remote / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", remote, tiny_data, out, max_steps=2)
    proc = launch("recipes/classification.py", ["--config", str(cfg), "--model.trust_remote_code", "true"],
                  "single.yaml")
    check_ok(proc)
    assert "export_check" in json.loads((out / "final" / "metrics.json").read_text())
    # a json.py in the working directory must not be imported by the reload check (`push --dry-run` reloads the
    # export in a fresh interpreter) or by eval (the console script, as a user runs it)
    (tmp_path / "json.py").write_text("raise SystemExit('the wrong json module was imported')\n")
    llmkit = str(Path(sys.executable).parent / "llmkit")
    for args in (["eval", str(out / "final"), "--data", str(tiny_data)],
                 ["push", str(out), "alice/remote", "--dry-run", "--output", str(tmp_path / "staged")]):
        done = subprocess.run([llmkit, *args], capture_output=True, text=True, env=LAUNCH_ENV, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 0, (args[0], done.stderr[-3000:])
    assert "accuracy" in json.dumps(json.loads((out / "final" / "eval-test" / "metrics.json").read_text()))
