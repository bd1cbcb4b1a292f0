"""The classification recipe end to end: `make demo`'s own command on the real assets, bounded, from a repo-root
layout with its relative output dir (and the commands on that run folder from elsewhere); LoRA sequence
classification on 2 real ranks (tiny Llama, tiny BERT) under ZeRO-2 and ZeRO-3, merged + adapter exports that
reload to the run's predictions; QLoRA refused on CPU; a trust_remote_code model."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    LAUNCH_ENV,
    ROOT,
    assert_export_agrees,
    assert_same_predictions,
    check_ok,
    launch,
    write_config,
    write_jsonl,
)

LM_ROWS = [("is this film good", "pos"), ("this film is bad", "neg"), ("you are helpful", "pos"),
           ("is this bad", "neg"), ("this is good", "pos"), ("bad film", "neg")]


def _lm_data(root):
    root.mkdir()
    for split, n in (("train", 48), ("validation", 13)):
        write_jsonl(root / f"{split}.jsonl", [{"text": LM_ROWS[i % 6][0], "label": LM_ROWS[i % 6][1]}
                                              for i in range(n)])
    return root


# each architecture under one stage (a run costs ~30-60 s on 2 CPU cores): the head's gather from ZeRO-3 and
# modules_to_save are the same code whatever the head is called; the ZeRO-2 run weighs classes
@pytest.mark.slow
@pytest.mark.parametrize(("arch", "stage"), [("llama", 3), ("bert", 2)])
def test_lora_classifier_exports_adapter_with_its_head(tmp_path, tiny_lm, tiny_bert, tiny_data, arch, stage):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, data = (tiny_lm / "model", _lm_data(tmp_path / "data")) if arch == "llama" else (tiny_bert, tiny_data)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", base, data, out, max_steps=4, learning_rate=5e-3)
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    if arch == "llama":
        raw["data"]["test_split"] = None
    if stage == 2:
        raw["train"]["class_weights"] = [1.0, 3.0]
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch("recipes/classification.py", ["--config", str(cfg)], f"cpu_zero{stage}.yaml")
    check_ok(proc)
    final = out / "final"
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    head = "score" if arch == "llama" else "classifier"
    assert adapter["task_type"] == "SEQ_CLS" and head in adapter["modules_to_save"]
    metrics = json.loads((final / "metrics.json").read_text())
    check = metrics["export_check"]
    assert check["same_predictions"] == check["rows"] and check["adapter"]["same_predictions"] == check["rows"]
    # the run's own validation logits (from its probabilities) against both reloads, done here with plain peft
    rows = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()][:6]
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    config = merged.config
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        want = merged(**enc).logits
        got = []
        for seed in (0, 1):  # a head re-initialised on reload would differ between seeds
            torch.manual_seed(seed)
            body = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
                pad_token_id=config.pad_token_id)
            got.append(PeftModel.from_pretrained(body, final / "adapter").eval()(**enc).logits)
    assert torch.allclose(got[0], got[1]) and torch.allclose(got[0], want, atol=1e-4)
    probs = np.array([r["probabilities"] for r in rows])
    assert np.allclose(torch.softmax(want, -1).numpy(), probs, atol=1e-3)
    if stage == 2:  # class weights: logged, and in the summary the card reads
        assert "class weights: neg 1.000, pos 3.000" in proc.stdout + proc.stderr
        assert metrics["train"]["class_weights"] == {"neg": 1.0, "pos": 3.0}


def test_qlora_is_refused_on_cpu_with_the_reason(tmp_path, tiny_lm):
    """bitsandbytes' CPU backend (0.50) trains a 4-bit model but fails its first no-grad forward after a training
    step (evaluation, export): measured here, so QLoRA is refused before anything starts on a machine without CUDA."""
    import torch

    from llmkit.config import load_config
    from llmkit.errors import LlmkitError
    from llmkit.launch.preflight import check

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA runs (test_qlora_trains_on_a_4bit_base_and_exports)")
    cfg = write_config(tmp_path / "c.yaml", tiny_lm / "model", _lm_data(tmp_path / "data"), tmp_path / "out")
    loaded = load_config(cfg, ["--lora.enabled", "true", "--lora.load_in_4bit", "true", "--data.test_split", "null"])
    with pytest.raises(LlmkitError, match="needs a CUDA GPU: bitsandbytes' CPU backend fails"):
        check(loaded, 1, "classification")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA runs on CUDA GPUs (refused on CPU, tested above)")
@pytest.mark.parametrize(("recipe", "stage"), [("classification", 2), ("causal_lm", 3)])
def test_qlora_trains_on_a_4bit_base_and_exports(tmp_path, tiny_lm, recipe, stage):
    """QLoRA on a GPU: the base loads as 4-bit NF4 (stored in the compute dtype, so ZeRO-3 can partition it),
    LoRA trains on top, the adapter reloads on the same 4-bit base to the run's logits, and the merge into the
    full-precision base is a plain model whose drift is reported."""
    from helpers import write_lm_config

    out = tmp_path / "run"
    if recipe == "classification":
        cfg = write_config(tmp_path / "c.yaml", tiny_lm / "model", _lm_data(tmp_path / "data"), out, max_steps=3)
    else:
        cfg = write_lm_config(tmp_path / "c.yaml", tiny_lm, out, lora=True, max_steps=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "load_in_4bit": True}
    raw["data"]["test_split"] = None
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch(f"recipes/{recipe}.py", ["--config", str(cfg)], f"zero{stage}.yaml",
                  num_processes=torch.cuda.device_count())
    check_ok(proc)
    check = json.loads((out / "final" / "metrics.json").read_text())["export_check"]
    if recipe == "classification":
        assert_export_agrees(check["adapter"])  # a GPU bf16/fp16 run reloaded in fp32 on the CPU: near ties may flip
        assert check["merged_from_full_precision_base"] is True
        merged = out / "final"
    else:
        assert check["adapter_on_4bit_base"] < 5e-2 and "merged_relative" in check
        merged = out / "final" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # the merged export needs no bitsandbytes


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
    cfg = write_config(tmp_path / "c.yaml", remote, tiny_data, out, max_steps=2, verify_export=True)
    proc = launch("recipes/classification.py", ["--config", str(cfg), "--model.trust_remote_code", "true"],
                  "single.yaml")
    check_ok(proc)
    assert json.loads((out / "final" / "metrics.json").read_text())["export_check"]["rows"] > 0
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


# bounds on top of the demo's own command: a few steps and evaluation rows, nothing else changed
DEMO_BOUNDS = ["--train.max_steps", "40", "--data.max_eval_samples", "256"]


DEMO_OUTPUT = Path("outputs/sentiment_minilm_polarity")  # the demo config's output_dir, relative to the repo root


def demo_command() -> tuple[dict[str, str], list[str]]:
    """The command `make demo` runs and the variables it sets before it (NAME=value), read from the Makefile with
    `make -n` so this test follows any change."""
    proc = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.replace("\\\n", " ").splitlines()
    launch_lines = [line for line in lines if "accelerate launch" in line]
    assert len(launch_lines) == 1, proc.stdout
    words = shlex.split(launch_lines[0])
    env = dict(w.split("=", 1) for w in itertools.takewhile(lambda w: re.fullmatch(r"[A-Za-z_]\w*=.*", w), words))
    cmd = words[len(env):]
    if not (ROOT / cmd[0]).exists():  # the suite runs from another environment than the Makefile's .venv
        cmd[0] = str(Path(sys.executable).with_name("accelerate"))
    return env, cmd


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`make demo`'s command, bounded, run from a copy of the repo root's layout (its folders linked), so its
    relative paths and relative output directory are exactly the README's and a user's outputs/ stays untouched."""
    root = tmp_path_factory.mktemp("repo_root")
    for name in ("recipes", "accelerate_configs", "ds_configs", ".venv"):
        if (ROOT / name).exists():
            (root / name).symlink_to(ROOT / name)
    env, cmd = demo_command()
    assert "--config_file" in cmd and not any(Path(a).is_absolute() for a in cmd[1:]), cmd
    proc = subprocess.run([*cmd, *DEMO_BOUNDS], cwd=root, env={**LAUNCH_ENV, **env}, capture_output=True, text=True,
                          timeout=900)
    check_ok(proc)
    return root, proc.stdout + proc.stderr


@pytest.mark.slow
def test_make_demo_runs_from_the_repo_root_and_exports_a_loadable_model(demo_run, tmp_path):
    root, log = demo_run
    out = root / DEMO_OUTPUT
    assert "data: train 8433, validation 256, test 256 rows; labels ['negative', 'positive']" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 40
    # 40 steps of 32 rows already learn something real on this data
    assert metrics["test"]["accuracy"] > 0.65, metrics["test"]
    assert metrics["train"]["padding_efficiency"] > 0.9
    # what the Makefile promises at the end, and the report's explanations (the demo keeps the default 8)
    assert (out / "report.html").is_file() and (out / "final" / "model.safetensors").is_file()
    assert len(json.loads((out / "explanations.json").read_text())["rows"]) == 8
    assert "Why the model said that (test, 8 rows)" in (out / "report.html").read_text()
    assert not (out / "final.tmp").exists()
    # issue 49: the training rows' data map and the suspects, from the training forward (part of one epoch)
    mapped = json.loads((out / "report.json").read_text())["runs"][0]["data_map"]
    assert (mapped["rows"], mapped["train_rows"], mapped["epochs"]["most"]) == (40 * 32, 8433, 1)
    assert len(mapped["suspects"]) == 20 and all(s["text"] and s["aum"] < 0 for s in mapped["suspects"][:5])
    page = (out / "report.html").read_text()
    assert "<h3>Training data map</h3>" in page and f'data-plot="datamap_{out.name}"' in page
    assert "Variability is not measured: each row was trained in one epoch" in page
    assert "Training rows most likely mislabeled (lowest AUM first, 20)" in (out / "report.md").read_text()

    # the export loads in plain transformers (a fresh interpreter, no llmkit import) and predicts what the run did
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder = {str(out / "final")!r}
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        texts = json.load(open({str(tmp_path / "texts.json")!r}))
        with torch.no_grad():
            logits = model(**tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits
        print(json.dumps([model.config.id2label[int(i)] for i in logits.argmax(-1)]))
        assert "llmkit" not in sys.modules
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    predicted = json.loads(got.stdout.strip().splitlines()[-1])
    # the demo's precision is auto: bf16 on a CPU with native bf16 (or a GPU), where a near tie may flip
    precision = json.loads((out / "run_info.json").read_text())["precision"]
    assert_same_predictions(predicted, rows, precision)
    flipped = sum(p != r["prediction"] for p, r in zip(predicted, rows))
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert abs(accuracy - metrics["test"]["accuracy"]) <= flipped / len(rows) + 1e-9


# what other libraries said in the demo's log because of llmkit's own code or launch (issue 47): none may come back
CAUSED_BY_LLMKIT = {
    "DeepSpeed guessing the CPU (DS_ACCELERATOR: the Makefile, llmkit.logs)": "get_accelerator] Setting accelerator",
    "torchrun's thread banner (OMP_NUM_THREADS: the Makefile)": "Setting OMP_NUM_THREADS environment variable",
    "a deprecated config attribute read (model config's dtype)": "`torch_dtype` is deprecated",
    "a deprecated checkpointing name called (llmkit.model._checkpointing)": "checkpointing` is deprecated",
    "datasets' sort under pyarrow 25+ (data.packing.by_length)": "null_placement",
    "transformers' load report table, per rank (llmkit's one model: line)": "LOAD REPORT",
    "transformers' shard bars (rank 0 says what it loads and writes)": "Loading weights",
}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WARNED = re.compile(r"\S+\.py:\d+: (\w*Warning: .*)")  # Python's warning line, maybe behind a progress bar
BAR = re.compile(r"([A-Z][^:|]*): .*(?:it/s|examples/s)")  # another library's progress bar (llmkit's: lower-case)


def other_libraries(log: str) -> Counter:
    """What other libraries said in a launch's log, each counted by its text (digits, so timestamps and pids, left
    out; a progress bar once however often it redraws). llmkit's own lines start lower-case or indented."""
    said, bars = Counter(), set()
    for chunk in re.split(r"[\r\n]", ANSI.sub("", log)):
        warned, bar = WARNED.search(chunk), BAR.match(chunk)
        if warned:
            said[warned.group(1)] += 1
        elif bar:
            bars.add(bar.group(1))
        elif chunk.strip() and not re.match(r"\s|[a-z]", chunk):
            said[re.sub(r"\d", "#", chunk)] += 1
    return said + Counter(bars)


def test_other_libraries_are_counted_by_what_they_say():
    log = ("[2026-12-07 03:53:16,253] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n"
           "[2026-12-07 03:53:36,227] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n"
           "check: disk: ~0.08 GiB needed\n        parameters             0.085 GiB\n"
           "Loading weights:   0%|          | 0/103 [00:00<?, ?it/s]\rLoading weights: 100%|| 103/103 [18558.07it/s]\n"
           "train:   0%|          | 0/10 [00:00<?, ?it/s]/x/c10d_logger.py:83: FutureWarning: `a` is deprecated.\n"
           "  return func(*args, **kwargs)\n\x1b[1mDeepSpeed\x1b[0m op built successfully\n")
    assert other_libraries(log) == Counter({
        "[####-##-## ##:##:##,###] [WARNING] [real_accelerator.py:###:get_accelerator] Setting accelerator to CPU.": 2,
        "FutureWarning: `a` is deprecated.": 1, "Loading weights": 1, "DeepSpeed op built successfully": 1})


@pytest.mark.slow
def test_make_demo_log_says_each_other_librarys_line_once_and_none_llmkit_causes(demo_run):
    """Issue 47: of what other libraries print, nothing llmkit's code or launch causes, and the rest once (rank 0)."""
    _, log = demo_run
    assert [why for why, text in CAUSED_BY_LLMKIT.items() if text in log] == [], log[-6000:]
    said = other_libraries(log)
    assert {text: n for text, n in said.items() if n > 1} == {}, said
    assert "model: initialised fresh (not in the checkpoint): classifier.bias, classifier.weight" in log


@pytest.mark.slow
def test_commands_take_a_relative_run_folder_from_another_directory(demo_run, tmp_path):
    """llmkit eval / report / explain / push --dry-run on the demo's run folder named by a relative path, from a
    working directory that is neither the run's nor the repo's: the commands that hand paths to fresh processes."""
    root, _ = demo_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = os.path.relpath(root / DEMO_OUTPUT, elsewhere)
    assert not Path(run).is_absolute() and run.startswith("..")
    rows = [json.loads(line) for line in (root / DEMO_OUTPUT / "predictions_test.jsonl").read_text().splitlines()]
    write_jsonl(elsewhere / "rows.jsonl", [{"text": r["text"], "label": r["label"]} for r in rows[:24]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def llmkit(*args: str) -> str:
        got = subprocess.run([sys.executable, "-m", "llmkit.cli", *args], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=600)
        assert got.returncode == 0, f"{args}\n{got.stdout[-2000:]}\n{got.stderr[-3000:]}"
        return got.stdout

    said = llmkit("eval", f"{run}/final", "--data", "rows.jsonl", "--output", "eval_out")
    assert "test: accuracy" in said and (elsewhere / "eval_out" / "metrics.json").is_file()
    assert json.loads((elsewhere / "eval_out" / "metrics.json").read_text())["test"]["samples"] == 24
    llmkit("report", run, "eval_out", "--output", "both")
    assert {r["name"] for r in json.loads((elsewhere / "both" / "report.json").read_text())["runs"]} >= {"eval_out"}
    said = llmkit("explain", f"{run}/final", "--text", "a gorgeous, witty film")
    assert "predicted:" in said and "gorgeous" in said
    llmkit("push", run, "someone/demo", "--dry-run", "--output", "staged")  # re-checks the export in a fresh process
    assert (elsewhere / "staged" / "model.safetensors").is_file() and (elsewhere / "staged" / "README.md").is_file()


@pytest.mark.slow
def test_a_step_after_the_verified_export_that_fails_ends_every_rank_cleanly(tmp_path, tiny_bert, tiny_data):
    """The explanations fail on rank 0 after the export is verified: every rank ends with the one llmkit line
    (exit 2), none dies in a barrier with a connection error, and final/ stays as verified."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, tiny_data, out, explain_rows=4, max_steps=2)
    proc = launch("recipes/classification.py", ["--config", str(cfg)], env={"LLMKIT_FAULT": "explain@0:0"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmkit: error:")]
    assert len(errors) == 1 and "explaining the report's rows failed" in errors[0], proc.stderr[-3000:]
    root = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "exitcode  : 2" in root and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final.tmp").exists()
