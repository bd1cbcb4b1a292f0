"""The `llmkit` command's errors: the bad-input battery (tests/bad_inputs.py: exit 2, one clear line, no traceback,
nothing changed), the same under `llmkit launch` and plain `accelerate launch`, and a bug keeping its traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import bad_inputs
import pytest
from helpers import LAUNCH_ENV, ROOT, launch, launch_command, write_config


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


# under a launcher: an error met in the data, after the process group started; one met before it, by the preflight
# every rank runs: test_llmkit_launch_into_a_folder_of_another_run_prints_only_its_line (the preflight's precision
# and DeepSpeed-JSON refusals in process: test_config)
UNDER_LAUNCH = [("--data.text_column=sentence", "split 'train' has no column 'sentence'")]


@pytest.mark.slow
@pytest.mark.parametrize(("arg", "message"), UNDER_LAUNCH, ids=["data"])
def test_llmkit_launch_user_error_is_one_line_and_exit_2(tmp_path, tiny_bert, tiny_data, arg, message):
    """`llmkit launch` is `accelerate launch` whose user errors end as exit 2 and the one llmkit line, with no
    traceback of the launcher or of another rank; the run folder is left so the fixed command runs."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    cmd = [sys.executable, "-m", "llmkit.cli", "launch", *launch_command("recipes/classification.py", [
        "--config", str(cfg), arg], "cpu_zero2.yaml")[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"llmkit: error: {message}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # none of torch's launcher lines (W/E + date: its thread banner, the ranks it stopped, the failed rank)
    assert [line for line in proc.stderr.splitlines() if re.match(r"[WE]\d{4} ", line)] == [], proc.stderr[-3000:]
    if (tmp_path / "out").exists():  # a run stopped before its first step: the same folder is "new" again
        from llmkit.config import load_config
        from llmkit.rundir.layout import RunDir
        from llmkit.rundir.life import intent

        loaded = load_config(cfg)
        assert intent(loaded, RunDir.of(loaded.output.output_dir)) == "new"


@pytest.mark.slow
def test_llmkit_launch_into_a_folder_of_another_run_prints_only_its_line(tmp_path, tiny_bert, tiny_data):
    """Issue 47: a relaunch into a used run folder through `llmkit launch` said its one line inside the launcher's
    own (its thread banner, DeepSpeed's CPU guess, the ranks it stopped, the failed one): now the line alone."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    cmd = [sys.executable, "-m", "llmkit.cli", "launch",
           *launch_command("recipes/classification.py", ["--config", str(cfg)], "cpu_zero2.yaml")[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = (proc.stdout + proc.stderr).splitlines()
    assert len(said) == 1 and said[0].startswith("llmkit: error: output.output_dir"), said
    assert "already holds files from another run" in said[0]
    # refused before any process group: nothing started there, the other run's file as it was
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]
    assert (tmp_path / "out" / "metrics.json").read_text() == "{}"


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
    code = "from llmkit.commands.entry import guarded\nguarded(lambda: 1 / 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


