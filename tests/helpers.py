"""Helpers shared by the tests: tiny sentiment data, recipe configs, and a launcher for real 2-rank runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = "great good fun wonderful moving charming brilliant superb".split()
NEGATIVE = "bad awful boring dull weak tedious clumsy bland".split()
FILLER = "the a movie film was is and very quite plot acting story".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentences(n: int, seed: int, string_labels: bool = True) -> list[dict]:
    """Rows whose label follows from the sentiment words they contain, with varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 14)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        value = ("pos" if label else "neg") if string_labels else label
        rows.append({"text": " ".join(words), "label": value})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_bert(out: Path, labels: list[str] | None = None) -> Path:
    """A 2-layer BERT with a 40-word vocabulary and its fast tokenizer, saved as a model folder in `out` (two
    labels, LABEL_0 and LABEL_1, unless `labels` names them)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = SPECIAL + FILLER + POSITIVE + NEGATIVE
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels or "ab"), **names)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_data(out: Path) -> Path:
    """train (96 rows) / validation (37, uneven for 2 ranks) / test (29) jsonl with string labels, in `out`."""
    for split, n, seed in (("train", 96, 1), ("validation", 37, 2), ("test", 29, 3)):
        write_jsonl(out / f"{split}.jsonl", make_sentences(n, seed))
    return out


THREE_CLASSES = ["negative", "neutral", "positive"]


def build_three_class_run(root: Path, explain_rows: int = 6, max_steps: int = 256) -> Path:
    """A 3-label run folder made in this process (no launch, no fresh process): the tiny BERT trained for a few
    seconds to say negative / positive for rows with such words and neutral for filler alone, saved as final/, its
    predictions on 24 test rows, metrics.json, and explanations.json written by the report's own code
    (llmkit.evals.explain, as its fresh process would)."""
    import torch

    from llmkit.evals import explain

    def sample(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            label = i % 3
            words = rng.choices(FILLER, k=rng.randint(2, 8)) + rng.choices([NEGATIVE, FILLER, POSITIVE][label], k=2)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": THREE_CLASSES[label]})
        return rows

    final = build_tiny_bert(root / "final", THREE_CLASSES)
    subject = explain.load(final)
    model, tok = subject.model, subject.tokenizer
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    train = sample(192, 1)
    for _ in range(3):
        for i in range(0, len(train), 16):
            batch = train[i:i + 16]
            enc = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
            labels = torch.tensor([THREE_CLASSES.index(r["label"]) for r in batch])
            model(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval().save_pretrained(final)
    test = sample(24, 3)
    with torch.no_grad():
        probs = model(**tok([r["text"] for r in test], padding=True, return_tensors="pt")).logits.softmax(-1)
    predictions = [{"row": i, **r, "prediction": THREE_CLASSES[int(p.argmax())],
                    "probabilities": [round(float(x), 6) for x in p]} for i, (r, p) in enumerate(zip(test, probs))]
    write_jsonl(root / "predictions_test.jsonl", predictions)
    right = sum(r["prediction"] == r["label"] for r in predictions)
    metrics = {"label_names": THREE_CLASSES, "test": {"accuracy": right / len(test), "samples": len(test)}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    explain._write(root, "test", explain_rows, 0, False, max_steps)
    return root


# a word-level tokenizer with a ChatML template, for tiny causal LMs
LM_SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
LM_WORDS = "system user assistant you are helpful is this film good positive negative bad hi".split()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_lm_config(path: Path, tiny_lm: Path, output: Path, lora: bool, **train) -> Path:
    """A causal-LM recipe YAML: the tiny Llama on its prompt/response data, fp32."""
    import yaml

    cfg = {
        "model": {"name_or_path": str(tiny_lm / "model")},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": str(tiny_lm / "data"), "test_split": None, "prompt_column": "prompt",
                 "response_column": "response", "max_length": 32},
        "train": {"epochs": 1, "per_device_batch_size": 4, "eval_batch_size": 4, "learning_rate": 5e-3,
                  "warmup_ratio": 0.0, "precision": "fp32", **train},
        "output": {"output_dir": str(output)},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_config(path: Path, model: Path, data: Path, output: Path, explain_rows: int = 0, verify_export: bool = False,
                 quantize: tuple[str, ...] = (), **train) -> Path:
    """A recipe YAML for the tiny model and data. No explanations and no fresh-process reload of the export unless
    asked (each costs a fresh process): the tests that check those ask."""
    import yaml

    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"dataset": str(data), "max_length": 32},
        "train": {"epochs": 1, "per_device_batch_size": 8, "eval_batch_size": 4, "learning_rate": 1e-3,
                  "warmup_ratio": 0.0, "logging_steps": 2, "precision": "fp32", **train},
        "output": {"output_dir": str(output), "explain_rows": explain_rows, "verify_export": verify_export,
                   "quantize": list(quantize)},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_tiny_lm(root: Path) -> Path:
    """A tiny Llama with a word-level tokenizer and a ChatML template (root/model), plus prompt/response data
    (root/data)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_SPECIAL + LM_WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(LM_SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    prompts = ["is this film good", "this film is bad", "you are helpful", "is this bad"]
    answers = ["positive", "negative", "positive", "negative"]
    for split, n in (("train", 48), ("validation", 13)):
        rows = [{"prompt": prompts[i % 4], "response": answers[i % 4]} for i in range(n)]
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


LAUNCHES: list[str] = []  # every `accelerate launch` command this session built (the summary counts them)


def launch_command(script: str, args: list[str], accelerate_config: str | None = "cpu_zero2.yaml",
                   num_processes: int | None = None, launcher_args: list[str] = ()) -> list[str]:
    """The `accelerate launch` command line for a script of this repo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", str(ROOT / "accelerate_configs" / accelerate_config)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if "--main_process_port" not in launcher_args:  # no fixed port: another job on the machine may hold it
        cmd += ["--main_process_port", str(free_ports(1)[0])]
    LAUNCHES.append(script)
    return [*cmd, *launcher_args, str(ROOT / script), *args]


LAUNCH_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(script: str, args: list[str], accelerate_config: str | None = "cpu_zero2.yaml",
           num_processes: int | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script under `accelerate launch` (real processes) from the repo root; return the finished process."""
    cmd = launch_command(script, args, accelerate_config, num_processes)
    return subprocess.run(cmd, cwd=ROOT, env={**LAUNCH_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def check_numerics(out: Path, cfg: Path, accelerate_config: str, steps: int, extra: list[str] = (),
                   recipe: str = "classification", fault: str | None = None, timeout: int = 900):
    """`llmkit check-numerics` of a recipe config (one `accelerate launch`, counted in LAUNCHES), optionally with an
    LLMKIT_FAULT planted in the run; returns the finished process and its verdict (None when it wrote none)."""
    LAUNCHES.append(f"check-numerics {recipe}")
    cmd = [sys.executable, "-m", "llmkit.cli", "check-numerics", recipe, "--config", str(cfg), "--accelerate-config",
           accelerate_config, "--steps", str(steps), "--output", str(out), "--main-process-port",
           str(free_ports(1)[0]), *extra]
    env = {**LAUNCH_ENV, **({"LLMKIT_FAULT": fault} if fault else {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    verdict = out / "verdict.json"
    return proc, json.loads(verdict.read_text()) if verdict.is_file() else None


def cli(args: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`llmkit <args>` in this process, finished as a process would be (exit code, stdout, stderr): for a command a
    test expects to refuse, or one that starts no process of its own; a fresh interpreter would only add its
    imports (seconds each on a 2-core machine)."""
    import contextlib
    import io

    from llmkit import cli as entry
    from llmkit.launch import parallel

    out, err, code, here = io.StringIO(), io.StringIO(), 0, Path.cwd()
    with parallel.environ({"HF_HUB_OFFLINE": "1", **(env or {})}), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            if cwd is not None:
                os.chdir(cwd)
            entry.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(["llmkit", *args], code, out.getvalue(), err.getvalue())


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (all held open together while picked, so none repeats)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def fake_run(out: Path) -> Path:
    """A folder as an earlier llmkit run leaves it, plus a file of the user's."""
    from llmkit.rundir.layout import RunDir

    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    for name in (RunDir(out).marker.name, "metrics.jsonl", "predictions_test.jsonl", "training_config.yaml", "run_info.json"):
        (out / name).write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    return out


def faulty_run(tmp_path: Path, model: Path, data: Path, stage: int, fault: str, **train):
    """A 2-rank run saving every 2 steps, with LLMKIT_FAULT injected (llmkit.faults); it must fail. The time the
    fault fired is written to tmp_path/fault_time."""
    import yaml

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", model, data, out, epochs=2, **train)
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"save_every_steps": 2}
    cfg.write_text(yaml.safe_dump(raw))
    proc = launch("recipes/classification.py", ["--config", str(cfg)], f"cpu_zero{stage}.yaml",
                  env={"LLMKIT_FAULT": fault, "LLMKIT_FAULT_STAMP": str(tmp_path / "fault_time")})
    assert proc.returncode != 0
    return out, cfg, proc


def losses_of(run_dir: Path) -> dict[int, float]:
    """step -> train loss, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# a bf16/fp16 run's probabilities are off by ~1e-2 from an fp32 reload's: where its top two were this close, the
# reload may pick the other label without anything being wrong
NEAR_TIE = 0.05


def assert_same_predictions(predicted: list[str], rows: list[dict], precision: str) -> None:
    """An fp32 reload's labels against a run's predictions rows: all equal for an fp32 run; for bf16/fp16 only
    near ties (top two probabilities within NEAR_TIE) may differ."""
    for label, row in zip(predicted, rows, strict=True):
        top = sorted(row["probabilities"])[-2:]
        tie = precision != "fp32" and top[1] - top[0] < NEAR_TIE
        assert label == row["prediction"] or tie, (row, label, precision)


def assert_export_agrees(check: dict) -> None:
    """An export check (metrics.json export_check, or its adapter part): every prediction the reload made is the
    run's, except near ties in a bf16/fp16 run's rounding (fp32: its tolerance is 1e-3, so none in practice)."""
    assert check["rows"] > 0 and check["same_predictions"] >= check["rows"] - check["near_ties"], check


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def changed(cfg, values: dict):
    """A copy of a (frozen) config with {"section.key": value} changed, unchecked: for tests that hand one
    module a config a YAML could not give it, or give it faster."""
    import dataclasses

    sections = {}
    for key, value in values.items():
        section, leaf = key.split(".", 1)
        sections.setdefault(section, {})[leaf] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


# each explained word of a page: laid out, its background colour and underline style
HIGHLIGHTS = ("return Array.from(document.querySelectorAll('td.why span')).map(s => {const r = "
              "s.getBoundingClientRect(); const c = getComputedStyle(s); return [r.width > 0 && r.height > 0, "
              "c.backgroundColor, c.borderBottomStyle];});")


@contextmanager
def chromium(tmp_path: Path):
    """A headless Chromium page (selenium) that keeps the browser console's log; skipped where Chromium is not
    installed, except under CI, which must run it (`make browser` installs it)."""
    import pytest

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if not (browser and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install the Debian packages chromium and chromium-driver")
        pytest.skip("no chromium / chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    page = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield page
    finally:
        page.quit()
