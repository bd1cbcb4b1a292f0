"""Shared fixtures: a tiny BERT and a tiny Llama made in-process, tiny sentiment data, DeepSpeed's CPU Adam op.
The helpers the tests import are in helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
from helpers import build_tiny_bert, build_tiny_data, build_tiny_lm, check_numerics, check_ok, launch, write_config


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a 40-word vocabulary and its fast tokenizer, saved as a model folder."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT with dropout off: runs that must compute the same numbers draw no random masks."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    config = AutoConfig.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for path in tiny_bert.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (out / path.name).write_bytes(path.read_bytes())  # the tokenizer files
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train (96 rows) / validation (37, uneven for 2 ranks) / test (29) jsonl with string labels."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def cpu_adam():
    """DeepSpeed's CPU Adam op for optimizer offload: JIT-built once per session (about a minute or more on
    2 cores the first time; cached in ~/.cache/torch_extensions afterwards)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer and a ChatML template, plus prompt/response data."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def lm_mixture_run(tmp_path_factory, tiny_lm):
    """A 2-rank ZeRO-2 full fine-tuning of the tiny Llama on a two-source mixture, evaluated every 2 steps with a
    sample generation, reporting to TensorBoard, MLflow, W&B and Trackio offline: read by the mixture test of
    test_recipe_causal_lm and by test_trackers. (proc, cfg, out, root, env)"""
    from types import SimpleNamespace

    from lm_runs import RUN_NAME, TAGS, as_mixture

    root = tmp_path_factory.mktemp("lm_mixture")
    out = root / "run"
    cfg = helpers.write_lm_config(root / "c.yaml", tiny_lm, out, lora=False, epochs=2, logging_steps=1,
                                  eval_every_steps=2, sample_prompts=["hi"], sample_max_new_tokens=2,
                                  report_to=["tensorboard", "mlflow", "wandb", "trackio"], run_name=RUN_NAME,
                                  tracker_tags=TAGS)
    as_mixture(cfg, tiny_lm, root)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(root / "trackio")}
    proc = launch("recipes/causal_lm.py", ["--config", str(cfg)], "cpu_zero2.yaml", env=env)
    check_ok(proc)
    return SimpleNamespace(proc=proc, cfg=cfg, out=out, root=root, env=env)


def pytest_terminal_summary(terminalreporter):
    """How many `accelerate launch` runs the session made: the suite's main cost, watched across changes."""
    if helpers.LAUNCHES:
        by_script = {s: helpers.LAUNCHES.count(s) for s in sorted(set(helpers.LAUNCHES))}
        terminalreporter.write_line(f"accelerate launch runs: {len(helpers.LAUNCHES)} ({by_script})")


ZERO_RUN_ROWS = 80  # of the 96 training rows: 2 epochs are 10 steps of 16 rows (8 x 2 ranks, 4 x 2 x accumulation 2)
ZERO_RUN_STEPS = 10
# every launcher llmkit ships that runs on a CPU machine (the cpu_* Accelerate configs, each offload JSON, single):
# name -> (Accelerate config, DeepSpeed JSON or None, rows per micro-batch, accumulation, more overrides)
# zero1 also runs the speed switches (2 DataLoader workers a rank, the profiler): test_train_optim reads its profile,
# and test_launch holds its losses and weights to zero0's, so the switches change nothing a run computes
SWITCHES = ("--train.dataloader_workers", "2", "--train.profile_steps", "2")
ZERO_RUNS = {**{f"zero{s}": (f"cpu_zero{s}", None, 8, 1, SWITCHES if s == 1 else ()) for s in range(4)},
             "zero2_accumulate": ("cpu_zero2", None, 4, 2, ()),
             "zero2_offload": ("cpu_zero2", "zero2_offload", 8, 1, ()),
             "zero3_offload": ("cpu_zero3", "zero3_offload", 8, 1, ()),
             "single_compiled": ("single", None, 16, 1, ("--train.torch_compile", "true"))}
# the runs whose export is reloaded in a fresh process by the run itself (output.verify_export: ZeRO-3 gathers,
# offloaded parameters, compiled blocks); the others' exports are reloaded in the tests (test_launch._predict)
VERIFIED = ("zero3", "zero3_offload", "single_compiled")


@pytest.fixture(scope="session")
def zero_runs(request, tmp_path_factory, tiny_bert_no_dropout, tiny_data):
    """Every CPU launcher llmkit ships, each a `llmkit check-numerics` of a 2-epoch fp32 classification run (10 steps
    of 16 rows: batch 8 x 2 ranks per ZeRO stage; ZeRO-2 also as 4 x accumulation 2 and with each offload JSON; one
    process with torch.compile): made once, the verdicts read by test_check_numerics, the run folders by the
    equivalence, export and DeepSpeed-path tests. No dropout: the comparisons are about the arithmetic, not random
    masks. The ZeRO-3 run also explains its report's rows (a fresh process: inside a ZeRO-3 rank the model would load
    partitioned, and that hung once)."""
    request.getfixturevalue("cpu_adam")  # the offload runs' op: compiled once, outside their launch's timeout
    root = tmp_path_factory.mktemp("zero_runs")
    out = {}
    for name, (accelerate_config, ds_file, batch, accumulation, extra) in ZERO_RUNS.items():
        cfg = write_config(root / f"{name}.yaml", tiny_bert_no_dropout, tiny_data, root / "unused", epochs=2,
                           logging_steps=1, per_device_batch_size=batch, gradient_accumulation_steps=accumulation,
                           learning_rate=2e-3, warmup_ratio=0.1)
        args = ["--data.group_by_length", "false", "--data.max_train_samples", str(ZERO_RUN_ROWS),
                "--output.verify_export", str(name in VERIFIED).lower(),
                "--output.explain_rows", "8" if name == "zero3" else "0",
                *(["--deepspeed.config_file", ds_file] if ds_file else []), *extra]
        proc, verdict = check_numerics(root / name, cfg, accelerate_config, ZERO_RUN_STEPS, args)
        assert verdict is not None and proc.returncode in (0, 1), proc.stderr[-6000:]  # test_check_numerics judges
        run_dir = root / name / "run"
        scalars = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = {"dir": run_dir, "log": proc.stdout + proc.stderr, "batch": batch, "accumulation": accumulation,
                     "verdict": verdict, "returncode": proc.returncode, "check": root / name,
                     "losses": [s["train/loss"] for s in scalars if "train/loss" in s],
                     "metrics": json.loads((run_dir / "metrics.json").read_text())}
    return out


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    """A test that starts a process is slow by definition: outside the `slow` mark, starting one fails the test
    and names the mark, so `make test-fast` stays fast as tests are added."""
    if request.node.get_closest_marker("slow") is None:
        import subprocess

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process ({args[1] if len(args) > 1 else args}): "
                                 "mark it @pytest.mark.slow")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_bert, tiny_data):
    """A real 2-rank ZeRO-2 classification run; the recipe writes its report (with 8 explained rows) and an int8
    ONNX copy (output.quantize) at the end: read by the report, `llmkit eval` and quantize tests."""
    root = tmp_path_factory.mktemp("report_run")
    out = root / "run"
    cfg = write_config(root / "c.yaml", tiny_bert, tiny_data, out, explain_rows=8, epochs=3, eval_every_steps=3,
                       quantize=("onnx-int8",))
    proc = launch("recipes/classification.py", ["--config", str(cfg)], "cpu_zero2.yaml")
    check_ok(proc)
    assert f"report: {out / 'report.html'}" in proc.stdout + proc.stderr
    return out
