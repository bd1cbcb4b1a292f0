"""The files llmkit ships (recipes, their configs, Accelerate and DeepSpeed configs) from any folder: a relative path
inside a file read against that file, names resolved, one error line naming where a missing path came from; and a
wheel of llmkit, installed into a fresh virtualenv, running a recipe by name from a folder outside the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import helpers
import pytest
import yaml
from helpers import LAUNCH_ENV, ROOT, check_ok, free_ports

from llmkit import shipped
from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.launch import parallel

# the shipped Accelerate configs that run DeepSpeed from a JSON, and the JSON each names
NAMED_JSON = {p.stem: yaml.safe_load(p.read_text())["deepspeed_config"]["deepspeed_config_file"]
              for p in sorted((ROOT / "accelerate_configs").glob("*.yaml"))
              if "deepspeed_config_file" in p.read_text()}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder outside the repo, with no launcher variables left in the environment."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    return folder


def test_shipped_accelerate_configs_name_their_deepspeed_json_from_any_folder(elsewhere):
    assert "cpu_zero2" in NAMED_JSON and len(NAMED_JSON) >= 8
    for name, written in NAMED_JSON.items():
        assert not Path(written).is_absolute() and not (elsewhere / written).exists()
        want = ROOT / written
        for given in (name, str(ROOT / "accelerate_configs" / f"{name}.yaml")):  # by name and by path
            env = parallel.accelerate_env(given)
            assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(want), (name, given)


def test_llmkit_launch_hands_the_processes_an_absolute_deepspeed_path(elsewhere):
    from accelerate.commands.launch import _validate_launch_command

    from llmkit.commands.launcher import launch_args

    args = launch_args(["--config_file", str(ROOT / "accelerate_configs/cpu_zero2.yaml"), "--num_processes", "1",
                        "classification", "--config", "sentiment_minilm_polarity"])
    assert args.config_file == str(ROOT / "accelerate_configs/cpu_zero2.yaml")
    assert args.training_script == str(ROOT / "recipes/classification.py")
    assert args.training_script_args == ["--config", "sentiment_minilm_polarity"]
    # what Accelerate makes of them: the absolute path stays (it would put the config's relative one back)
    args, _, _ = _validate_launch_command(args)
    assert args.deepspeed_config_file == str(ROOT / "ds_configs/zero2.json") and args.num_processes == 1
    # a DeepSpeed JSON given on the command line is the user's, left as typed
    args = launch_args(["--config_file", "cpu_zero3", "--deepspeed_config_file", "zero2_offload", "causal_lm"])
    assert args.deepspeed_config_file == "zero2_offload" and args.config_file.endswith("accelerate_configs/cpu_zero3.yaml")


def test_under_plain_accelerate_launch_the_shipped_relative_path_is_found_from_any_folder(elsewhere, monkeypatch):
    """`accelerate launch --config_file <repo>/accelerate_configs/cpu_zero2.yaml ...` from another folder hands the
    processes `ds_configs/zero2.json` as written: the run finds the shipped file (it said 'cannot be read as JSON:
    [Errno 2] No such file or directory' before)."""
    cfg = load_config("sentiment_minilm_polarity")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    ds = parallel.resolve_deepspeed(cfg, "fp32", 2, hidden=32)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 32

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/mine.json")
    with pytest.raises(LlmkitError) as err:
        parallel.uses_deepspeed(cfg)
    line = str(err.value)
    assert "\n" not in line
    for part in ("DeepSpeed config 'ds_configs/mine.json'", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                 f"looked in {elsewhere / 'ds_configs/mine.json'}", "`llmkit launch`", "absolute path"):
        assert part in line, part


def test_a_users_accelerate_config_reads_its_json_beside_it_and_a_missing_one_names_its_origin(elsewhere, tmp_path):
    conf = tmp_path / "configs"
    conf.mkdir()
    (conf / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    acc = conf / "acc.yaml"
    acc.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n")
    assert parallel.accelerate_env(acc)["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(conf / "ds.json")

    acc.write_text(acc.read_text().replace("ds.json", "json/zero9.json"))
    with pytest.raises(LlmkitError) as err:
        parallel.accelerate_env(acc)
    line = str(err.value)
    assert "\n" not in line
    for part in ("DeepSpeed config 'json/zero9.json'", f"deepspeed_config_file in Accelerate config '{acc}'",
                 str(conf / "json/zero9.json"), str(elsewhere / "json/zero9.json"), f"relative to the folder of '{acc}'",
                 "zero2_offload"):
        assert part in line, part


def test_a_recipe_configs_deepspeed_file_is_read_against_it_and_names_work(elsewhere, tmp_path):
    project = tmp_path / "project"
    (project / "ds").mkdir(parents=True)
    (project / "ds" / "mine.json").write_text("{}")
    cfg_file = project / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"name_or_path": "asset:minilm"}, "data": {"dataset": "asset:polarity"},
                                        "deepspeed": {"config_file": "ds/mine.json"}}))
    assert load_config(cfg_file).deepspeed.config_file == str(project / "ds" / "mine.json")
    # on the command line: the current folder, else a shipped path or name
    for given in ("zero2_offload", "ds_configs/zero2_offload.json"):
        got = load_config(cfg_file, ["--deepspeed.config_file", given]).deepspeed.config_file
        assert got == str(ROOT / "ds_configs/zero2_offload.json"), given
    with pytest.raises(LlmkitError, match=r"'zero7'.*did you mean 'zero\d'\?"):
        load_config(cfg_file, ["--deepspeed.config_file", "zero7"])
    # a shipped recipe config by name; a path that exists wins over a name
    assert load_config("sentiment_minilm_polarity").model.name_or_path == "asset:minilm"
    (elsewhere / "sentiment_minilm_polarity").mkdir()
    assert load_config("sentiment_minilm_polarity").data.dataset == "asset:polarity"
    with pytest.raises(LlmkitError, match="config file 'nope.yaml' does not exist: looked in"):
        load_config("nope.yaml")


def test_names_resolve_and_the_listing_shows_what_ships(elsewhere, capsys):
    from llmkit.cli import main

    assert shipped.root() == ROOT  # this checkout (an editable install reads the repo's own files)
    assert shipped.find("cpu_zero2", "accelerate") == ROOT / "accelerate_configs/cpu_zero2.yaml"
    assert shipped.find("zero3.json", "deepspeed") == ROOT / "ds_configs/zero3.json"
    assert shipped.find("recipes/classification.py", "recipe") == ROOT / "recipes/classification.py"
    mine = elsewhere / "cpu_zero2.yaml"
    mine.write_text("num_processes: 1\n")
    assert shipped.find("cpu_zero2.yaml", "accelerate") == mine  # a file that exists is a path, not a name
    main(["recipes"])
    out = capsys.readouterr().out
    for name in ("classification", "causal_lm", "sentiment_minilm_polarity", "cpu_zero2", "zero3_offload"):
        assert f"  {name} " in out, name
    assert "Fine-tune a sequence classifier" in out


def test_every_llmkit_package_is_in_the_wheel_list():
    """pyproject lists llmkit's packages one by one (setuptools' find cannot also map the shipped folders in): a
    new package left off the list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapped = set(tool["packages"]), tool["package-dir"]
    present = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmkit").rglob("__init__.py")}
    assert present - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {present - listed}"
    assert {p for p in listed - present if p not in mapped} == set(), "listed but not in the tree"
    assert {n: (ROOT / d).is_dir() for n, d in mapped.items()} == dict.fromkeys(mapped, True)


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    check_ok(proc)
    return proc


def _wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build's own folders stay out of the repo)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("llmkit", "recipes", "accelerate_configs", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp_path / "dist", src], tmp_path)
    return next((tmp_path / "dist").glob("llmkit-*.whl"))


@pytest.mark.slow
def test_a_wheel_in_a_fresh_virtualenv_runs_a_recipe_by_name_from_any_folder(tmp_path, tiny_bert, tiny_data):
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # the dependencies (torch, ...) from this environment's site-packages: a path, so its own .pth files (the
    # editable install of this repo among them) are not run, and the repo never comes on the path
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)

    user = tmp_path / "user"
    user.mkdir()
    env = {k: v for k, v in LAUNCH_ENV.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([python, "-c", "import llmkit, llmkit.shipped as s; print(llmkit.__file__); print(s.root())"], user,
                 env).stdout.split()
    assert where == [str(site / "llmkit" / "__init__.py"), str(site / "llmkit" / "shipped")], where

    helpers.LAUNCHES.append("llmkit train (wheel)")
    proc = _run([venv / "bin" / "llmkit", "train", "classification", "--config", "sentiment_minilm_polarity",
                 "--accelerate-config", "cpu_zero2", "--num-processes", "1", "--main-process-port", free_ports(1)[0],
                 "--model.name_or_path", tiny_bert, "--data.dataset", tiny_data, "--data.label_names", "null",
                 "--data.max_length", "32", "--train.max_steps", "2", "--train.per_device_batch_size", "8",
                 "--train.eval_batch_size", "8", "--train.precision", "fp32", "--train.logging_steps", "1",
                 "--output.explain_rows", "0", "--output.verify_export", "false"], user, env, timeout=600)
    log = proc.stdout + proc.stderr
    out = user / "outputs" / "sentiment_minilm_polarity"  # the shipped config's relative output_dir, in the user's folder
    assert "1 process(es), cpu, precision fp32 (set in the config), DeepSpeed ZeRO-2" in log, log[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 2
    ds = json.loads((out / "ds_config.json").read_text())  # the shipped ZeRO-2 JSON, its "auto" filled
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
