"""A bounded run of the real default recipe (MiniLM asset, polarity split, 2 ranks, ZeRO-2)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import LAUNCH_ENV, ROOT, check_ok, launch, write_jsonl

pytestmark = pytest.mark.slow


# bounds on top of the demo's own command: a few steps and evaluation rows, nothing else changed
DEMO_BOUNDS = ["--train.max_steps", "40", "--data.max_eval_samples", "256"]
DEMO_OUTPUT = Path("outputs/sentiment_minilm_polarity")  # the demo config's output_dir, relative to the repo root


def demo_command() -> list[str]:
    """The command `make demo` runs, read from the Makefile with `make -n` so this test follows any change."""
    proc = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.replace("\\\n", " ").splitlines()
    launch_lines = [line for line in lines if "accelerate launch" in line]
    assert len(launch_lines) == 1, proc.stdout
    cmd = shlex.split(launch_lines[0])
    if not (ROOT / cmd[0]).exists():  # the suite runs from another environment than the Makefile's .venv
        cmd[0] = str(Path(sys.executable).with_name("accelerate"))
    return cmd


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`make demo`'s command, bounded, run from a copy of the repo root's layout (its folders linked), so its
    relative paths and relative output directory are exactly the README's and a user's outputs/ stays untouched."""
    root = tmp_path_factory.mktemp("repo_root")
    for name in ("recipes", "accelerate_configs", "ds_configs", ".venv"):
        if (ROOT / name).exists():
            (root / name).symlink_to(ROOT / name)
    cmd = demo_command()
    assert "--config_file" in cmd and not any(Path(a).is_absolute() for a in cmd[1:]), cmd
    proc = subprocess.run([*cmd, *DEMO_BOUNDS], cwd=root, env=LAUNCH_ENV, capture_output=True, text=True,
                          timeout=900)
    check_ok(proc)
    return root, proc.stdout + proc.stderr


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
    assert not (out / "final.tmp").exists()

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
    same = sum(p == r["prediction"] for p, r in zip(predicted, rows)) / len(rows)
    # the demo's precision is auto: bf16 on a CPU with native bf16, where a near tie may flip in the fp32 reload
    precision = json.loads((out / "run_info.json").read_text())["precision"]
    assert same == 1.0 if precision == "fp32" else same >= 0.97, (precision, same)
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=0.0 if same == 1.0 else 0.03)


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


def test_smollm2_lora_bounded_run_exports_and_generates(tmp_path):
    """The generative-sentiment recipe on the real SmolLM2 asset, a few steps: label scores, a merged export and
    an adapter that plain peft loads, and `llmkit generate` answering from the export."""
    out = tmp_path / "run"
    proc = launch("recipes/causal_lm.py", [
        "--config", str(ROOT / "recipes/configs/sentiment_smollm2_lora.yaml"), "--train.max_steps", "3",
        "--data.max_train_samples", "64", "--data.max_eval_samples", "8", "--output.output_dir", str(out)],
        "cpu_zero2.yaml", timeout=900)
    check_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["test"]["samples"] == 8
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["validation"]["perplexity"] > 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == 3 and samples[-1]["samples"][0]["completion"]
    final = out / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (final / "merged" / "model.safetensors").is_file()
    assert "<|im_start|>" in (final / "merged" / "chat_template.jinja").read_text()
    prompt = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
              "Review: a gorgeous, witty and deeply moving film.")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-m", "llmkit.cli", "generate", str(final), "--prompt", prompt,
                          "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip()  # the merged model answers (a few greedy tokens)
