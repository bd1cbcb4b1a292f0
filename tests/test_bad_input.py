"""Bad input fails early with one clear message (exit 2, no traceback); faults on 2 real ranks stop the run
with the step and a hint and never replace a good checkpoint; security rules of the code base."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import LAUNCH_ENV, ROOT, check_ok, launch, write_config

from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.preflight import check_output_dir_is_safe, warnings


def _validate(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit.cli", "validate", str(cfg), *extra], capture_output=True,
                          text=True, env=LAUNCH_ENV, timeout=300, cwd=ROOT)


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


def _bad(tmp_path, tiny_bert, tiny_data, change) -> Path:
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    raw = yaml.safe_load(cfg.read_text())
    change(raw, tmp_path)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BATTERY = [
    ("sequence length over the model max", lambda c, t: c["data"].update(max_length=100),
     "data.max_length 100 is over the model's limit of 64 positions (bert); set data.max_length <= 64"),
    ("model path that does not exist", lambda c, t: c["model"].update(name_or_path=str(t / "nope")),
     "model.name_or_path '{t}/nope' does not exist (neither a local dir nor a Hub id)"),
    ("a dir that is not a model", lambda c, t: (t.joinpath("empty").mkdir(), c["model"].update(
        name_or_path=str(t / "empty"))), "is a directory without config.json, so it is not a transformers model"),
    ("ds_config that does not parse", lambda c, t: c.setdefault("deepspeed", {}).update(
        config_file=_write(t / "ds.json", "{ not json")), "DeepSpeed config '{t}/ds.json' cannot be read as JSON"),
    ("empty split", lambda c, t: c["data"].update(dataset=None, data_files={
        "train": _write(t / "tr.jsonl", ""), "validation": _write(t / "va.jsonl", '{"text": "a", "label": "x"}\n')},
        test_split=None), "split 'train' is empty"),
    ("missing text column", lambda c, t: c["data"].update(text_column="review"),
     "split 'train' has no column 'review'"),
    ("unseen string label in eval", lambda c, t: c["data"].update(label_names=["neg", "pos"], dataset=None, data_files={
        "train": _write(t / "tr.jsonl", '{"text": "a", "label": "neg"}\n{"text": "b", "label": "pos"}\n'),
        "validation": _write(t / "va.jsonl", '{"text": "c", "label": "meh"}\n')}, test_split=None),
     "split 'validation' row 0: label 'meh' is not one of ['neg', 'pos']"),
    ("fp16 on CPU", lambda c, t: c["train"].update(precision="fp16"),
     "train.precision is fp16, but no GPU is available: fp16 with loss scaling is a GPU mode"),
    ("output dir is the working directory", lambda c, t: c["output"].update(output_dir="."),
     "is the working directory or one of its parents; point it at a dedicated folder"),
    ("unknown key with a suggestion", lambda c, t: c["train"].update(learnig_rate=1e-3),
     "unknown config key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
    ("wrong type", lambda c, t: c["train"].update(epochs="many"),
     "config key 'train.epochs' must be of type float, got 'many'"),
]


@pytest.mark.parametrize(("what", "change", "message"), BATTERY, ids=[b[0] for b in BATTERY])
def test_validate_battery_one_clear_message_exit_2(tmp_path, tiny_bert, tiny_data, what, change, message):
    cfg = _bad(tmp_path, tiny_bert, tiny_data, change)
    proc = _validate(cfg)
    assert proc.returncode == 2, (what, proc.stdout, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
    assert len(errors) == 1, proc.stderr
    assert message.format(t=tmp_path) in errors[0], errors[0]


def test_malformed_yaml_and_output_dir_of_another_run(tmp_path, tiny_bert, tiny_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    proc = _validate(bad)
    assert proc.returncode == 2 and f"config file '{bad}' is not valid YAML" in proc.stderr
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    proc = _validate(cfg)
    assert proc.returncode == 2 and "already holds files from another run" in proc.stderr


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


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, tiny_data):
    out, _, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "nan@3:1", logging_steps=10)
    assert ("llmkit: error: the training loss became NaN/inf at step 3: training diverged. The last good "
            "checkpoint is step-2") in proc.stderr
    assert "Traceback" not in proc.stderr.split("llmkit: error:")[0]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    assert json.loads((checkpoints / "step-2" / "manifest.json").read_text())["step"] == 2
    assert not (out / "final").exists()


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


def test_a_broken_training_row_is_named_even_on_another_rank(tmp_path, tiny_bert, tiny_data):
    # the length-grouped sampler deals row 5 to some rank in the first steps; only that rank fails
    out, _, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "row@5:1")
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert errors, proc.stderr[-3000:]
    assert "reading training row 5 failed: ValueError: a broken row (injected)" in errors[0]
    assert not (out / "final").exists()


def test_a_rank_killed_mid_step_ends_the_job_and_keeps_the_checkpoint(tmp_path, tiny_bert, tiny_data):
    import time

    out, cfg, proc = _faulty_run(tmp_path, tiny_bert, tiny_data, 2, "kill@5:1")
    after_kill = time.time() - float((tmp_path / "fault_time").read_text())
    assert after_kill < 60, after_kill  # the surviving rank and the launcher notice and stop
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    from llmkit import rundir

    assert rundir.verify_checkpoint(checkpoints / "step-4")["step"] == 4
