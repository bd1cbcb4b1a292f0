"""The bad-input battery: ordinary mistakes, each run through the `llmkit` command in this process (the same
`guarded` path a shell gives it). A case is clean when it exits 2 with exactly one `llmkit: error:` line that
holds the expected words, shows no traceback and changes no file; a legitimate input (`expect=None`) must pass.
tests/test_bad_input.py runs it under pytest; bench/bad_inputs.py prints "N of M bad inputs clean"."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from helpers import ROOT, cli, make_sentences, write_config, write_jsonl, write_lm_config

ACC = ROOT / "accelerate_configs"


@dataclass
class Case:
    kind: str  # the class of input: config, deepspeed, accelerate, env, data, model, checkpoint, hub, target
    name: str
    build: Callable[[Path, dict], list[str]]  # (tmp, assets) -> the `llmkit` arguments; writes its files in tmp
    expect: str | None  # words the error line must hold; None: a legitimate input that must pass
    env: dict = field(default_factory=dict)
    fresh: bool = False  # run in a new interpreter: the case needs settings read at import (HF_HUB_OFFLINE)


def _cfg(tmp: Path, a: dict, change=None, **extra) -> str:
    """The tiny BERT recipe config, changed by `change(raw, tmp)`."""
    cfg = write_config(tmp / "c.yaml", a["bert"], a["data"], tmp / "out", **extra)
    if change is not None:
        raw = yaml.safe_load(cfg.read_text())
        change(raw, tmp)
        cfg.write_text(yaml.safe_dump(raw))
    return str(cfg)


def validate(change=None, *extra: str, acc: str | None = None):
    """A case that runs `llmkit validate` on the changed config, with overrides `extra`."""
    def build(tmp: Path, a: dict) -> list[str]:
        args = ["validate", _cfg(tmp, a, change), *extra]
        return args + (["--accelerate-config", acc(tmp) if callable(acc) else acc] if acc else [])
    return build


def _write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _files(**splits: str | bytes):
    """data.data_files of csv/jsonl text written into tmp (name -> content); the test split off."""
    def change(raw, tmp):
        raw["data"].update(dataset=None, test_split=None,
                           data_files={split: _write(tmp / name, text) for split, (name, text) in splits.items()})
    return change


def _folder(folder: str, rows=None):
    """data.dataset: a folder named `folder` holding train/validation jsonl."""
    def change(raw, tmp):
        for split, n in (("train", 24), ("validation", 9)):
            write_jsonl(_mk(tmp / folder) / f"{split}.jsonl", rows or make_sentences(n, n))
        raw["data"].update(dataset=str(tmp / folder), test_split=None)
    return change


def _truncated_copy(model: Path, out: Path) -> None:
    """The model folder copied with its weights file cut in half, as an interrupted copy leaves it."""
    out.mkdir(parents=True)
    for file in model.iterdir():
        data = file.read_bytes()
        (out / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)


def _damaged_run(t: Path, a: dict) -> Path:
    """A run folder as a crash or an interrupted copy leaves it: the export's weights cut short, a predictions file
    with a damaged line before its last."""
    from helpers import fake_run

    run = fake_run(t / "damaged")
    (run / "final" / "config.json").unlink()
    _truncated_copy(a["bert"], run / "final" / "model")
    for file in (run / "final" / "model").iterdir():
        file.rename(run / "final" / file.name)
    (run / "final" / "model").rmdir()
    (run / "metrics.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    row = {"row": 0, "text": "a film", "label": "pos", "prediction": "pos", "probabilities": [0.2, 0.8]}
    (run / "predictions_test.jsonl").write_text(json.dumps(row) + '\n{"row": 1, "te\n' + json.dumps(row) + "\n")
    return run


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _csv(rows: list[tuple[str, str]], newline: str = "\n") -> str:
    return newline.join(["text,label", *(f"{t},{lab}" for t, lab in rows)]) + newline


GOOD = [("the film was great fun", "pos"), ("a dull and boring plot", "neg"), ("wonderful acting", "pos"),
        ("bland weak story", "neg")]
VALID = [("moving and charming", "pos"), ("tedious film", "neg")]


def _jsonl(rows) -> str:
    return "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)


def _acc_yaml(text: str):
    return lambda tmp: _write(tmp / "acc.yaml", text)


def _ds_json(text: str):
    return lambda raw, tmp: raw.setdefault("deepspeed", {}).update(config_file=_write(tmp / "ds.json", text))


def _lm(change=None, *extra: str):
    """`llmkit validate` of the tiny Llama prompt/response recipe, changed by `change(raw, tmp)`."""
    def build(tmp: Path, a: dict) -> list[str]:
        cfg = write_lm_config(tmp / "c.yaml", a["lm"], tmp / "out", lora=False)
        if change is not None:
            raw = yaml.safe_load(cfg.read_text())
            change(raw, tmp)
            cfg.write_text(yaml.safe_dump(raw))
        return ["validate", str(cfg), *extra]
    return build


def _sft_rows(rows: list[dict]):
    """LM data in another row format (the same rows in train and validation), with no format keys set."""
    def change(raw, tmp):
        (tmp / "sft").mkdir(exist_ok=True)
        write_jsonl(tmp / "sft" / "train.jsonl", rows)
        write_jsonl(tmp / "sft" / "validation.jsonl", rows)
        raw["data"] = {"dataset": str(tmp / "sft"), "test_split": None, "max_length": 32}
    return change


def _big_tokenizer(tmp: Path) -> str:
    """A word-level BERT tokenizer of 100 words: more ids than the tiny model's 40 embeddings."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(95))]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp / "big_tok")
    return str(tmp / "big_tok")


def _one_long_prompt(raw, tmp):
    """LM data whose second row's prompt alone is longer than 12 tokens."""
    long = " ".join(["is this film good"] * 4)
    rows = "".join(json.dumps({"prompt": p, "response": "positive"}) + "\n" for p in ["hi", long, "hi", "is this bad"])
    data = _write(tmp / "lmdata" / "train.jsonl", rows)
    raw["data"].update(dataset=None, data_files={"train": data, "validation": data})


CASES: list[Case] = [
    # ---- the llmkit config: types, ranges, numbers that overflow later
    # the data holds 2 labels: a check that needs only the config and the data runs before the launch
    Case("data", "class weights for more labels than the data has",
         validate(None, "--train.class_weights", "[1.0, 2.0, 3.0]"), "train.class_weights lists 3 weights"),
    Case("config", "negative seed", validate(None, "--train.seed=-1"), "train.seed"),
    Case("config", "seed over 2**32", validate(None, "--train.seed", str(2**40)), "train.seed"),
    Case("config", "infinite epochs", validate(None, "--train.max_steps", "null", "--train.epochs", "inf"),
         "train.epochs"),
    Case("config", "NaN learning rate", validate(None, "--train.learning_rate", "nan"), "train.learning_rate"),
    Case("config", "absurd thread count", validate(None, "--train.num_threads", "99999999999"), "train.num_threads"),
    Case("config", "absurd max_steps", validate(None, "--train.max_steps", str(10**20)), "train.max_steps"),
    Case("config", "zero batch size", validate(None, "--train.per_device_batch_size", "0"),
         "train.per_device_batch_size"),
    Case("config", "typo in a key", validate(lambda c, t: c["train"].update(learnig_rate=1e-3)),
         "did you mean 'learning_rate'"),
    Case("config", "a word where a number goes", validate(None, "--train.epochs", "many"), "train.epochs"),
    Case("config", "override with nothing after =", validate(None, "--train.epochs="), "train.epochs"),
    Case("config", "a section that is a list", validate(lambda c, t: c.update(train=[1, 2])), "config section 'train'"),
    Case("config", "one label name", validate(lambda c, t: c["data"].update(label_names=["pos"])), "data.label_names"),
    Case("config", "bad Hub id to push to", validate(lambda c, t: c["output"].update(
        push_to_hub=True, hub_model_id="alice/bob/carol")), "output.hub_model_id"),
    Case("config", "max_length over the model's positions", validate(lambda c, t: c["data"].update(max_length=100)),
         "data.max_length 100 is over the model's limit of 64 positions (bert); set data.max_length <= 64"),
    Case("config", "YAML that does not parse", lambda t, a: ["validate", _write(t / "bad.yaml", "model: [unclosed\n")],
         "is not valid YAML"),
    Case("config", "a config path that is a folder", lambda t, a: ["validate", str(_mk(t / "conf"))], "not a file"),
    Case("config", "the Accelerate yaml given as the recipe", lambda t, a: ["validate", str(ACC / "cpu_zero2.yaml")],
         "unknown config section 'compute_environment'"),
    Case("config", "resume and overwrite both asked", validate(None, "--checkpoint.resume_from", "latest",
                                                               "--output.overwrite_output_dir", "true"),
         "overwrite_output_dir"),
    Case("config", "a new global batch with nothing to resume", validate(None, "--checkpoint.new_global_batch", "true"),
         "'checkpoint.new_global_batch' only changes how a resumed run continues"),
    Case("config", "text and label the same column", validate(None, "--data.text_column", "label"), "text_column"),
    Case("config", "every_save with no checkpoints", validate(lambda c, t: c["output"].update(
        push_to_hub=True, hub_model_id="alice/x", hub_strategy="every_save")), "every_save"),
    Case("config", "a branch name with a space", validate(lambda c, t: c["output"].update(hub_revision="my branch")),
         "output.hub_revision"),
    Case("config", "fp16 on a machine without a GPU", validate(None, "--train.precision", "fp16"),
         "fp16 with loss scaling is a GPU mode"),
    Case("config", "a section name with a typo", validate(None, "--trian.epochs", "1"), "did you mean 'train'"),
    Case("config", "two values after one key", validate(None, "--train.epochs", "1", "2"), "unexpected argument '2'"),
    Case("config", "a key set twice in the YAML", lambda t, a: ["validate", _write(t / "twice.yaml", (
        f"model: {{name_or_path: {a['bert']}}}\ndata: {{dataset: {a['data']}, max_length: 32}}\n"
        "train:\n  learning_rate: 1e-3\n  epochs: 1\n  learning_rate: 3e-5\n"))], "twice"),
    Case("config", "a decimal comma", validate(lambda c, t: c["train"].update(epochs="1,5")), "train.epochs"),
    Case("config", "a causal-LM key in a classification run", validate(None, "--data.prompt_template", "{text} ->",
                                                                        "--recipe", "classification"),
         "only recipes/causal_lm.py"),
    Case("config", "sample prompts for a classifier", validate(lambda c, t: c["train"].update(sample_prompts=["hi"])),
         "train.sample_prompts"),
    Case("config", "label names for a causal LM without labels", _lm(lambda c, t: c["data"].update(
        label_names=["a", "b"])), "data.label_names"),
    Case("config", "explained rows for a causal LM without labels", _lm(lambda c, t: c["output"].update(
        explain_rows=4)), "output.explain_rows"),
    Case("config", "half-precision weights for an fp32 run", validate(None, "--model.dtype", "float16"),
         "model.dtype float16 does not go with precision fp32"),
    Case("config", "flash attention without a GPU", validate(None, "--model.attn_implementation",
                                                             "flash_attention_2"), "needs a CUDA GPU"),
    Case("config", "an attention name with a typo", validate(None, "--model.attn_implementation", "spda"),
         "model.attn_implementation"),
    Case("config", "sdpa attention and float32 weights (works)", validate(None, "--model.attn_implementation", "sdpa",
                                                                          "--model.dtype", "float32"), None),
    Case("config", "QLoRA on a machine without a GPU", validate(None, "--lora.enabled", "true",
                                                                "--lora.load_in_4bit", "true"), "needs a CUDA GPU"),
    Case("config", "QLoRA without LoRA", validate(None, "--lora.load_in_4bit", "true"), "lora.load_in_4bit"),
    # ---- the output folder
    Case("output", "the working directory", validate(lambda c, t: c["output"].update(output_dir=".")),
         "is the working directory or one of its parents"),
    Case("output", "a folder holding another run", validate(lambda c, t: _write(t / "out" / "metrics.json", "{}")),
         "already holds files from another run"),
    Case("output", "a path that is a file", validate(lambda c, t: _write(t / "out", "not a folder")),
         "is not a directory"),
    # ---- the DeepSpeed JSON
    Case("deepspeed", "JSON whose bf16 is true", validate(_ds_json('{"bf16": true}')), "bf16"),
    Case("deepspeed", "JSON that is a list", validate(_ds_json("[]")), "JSON object"),
    Case("deepspeed", "zero_optimization a number", validate(_ds_json('{"zero_optimization": 3}')),
         "zero_optimization"),
    Case("deepspeed", "ZeRO stage 5", validate(_ds_json('{"zero_optimization": {"stage": 5}}')), "stage"),
    Case("deepspeed", "ZeRO stage as a word", validate(_ds_json('{"zero_optimization": {"stage": "three"}}')),
         "stage"),
    Case("deepspeed", "JSON that does not parse", validate(_ds_json("{ not json")), "cannot be read as JSON"),
    Case("deepspeed", "batch size that disagrees", validate(_ds_json(
        '{"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}')), "train_micro_batch_size"),
    Case("deepspeed", "NVMe offload without a path", validate(_ds_json(
        '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}')), "nvme_path"),
    # ---- the Accelerate yaml
    Case("accelerate", "yaml that is a list", validate(acc=_acc_yaml("- 1\n- 2\n")), "mapping"),
    Case("accelerate", "num_processes a word", validate(acc=_acc_yaml("num_processes: two\n")), "num_processes"),
    Case("accelerate", "num_processes 0", validate(acc=_acc_yaml("num_processes: 0\n")), "num_processes"),
    Case("accelerate", "deepspeed_config not a mapping", validate(acc=_acc_yaml(
        "distributed_type: DEEPSPEED\ndeepspeed_config: zero2\nnum_processes: 2\n")), "deepspeed_config"),
    Case("accelerate", "JSON file it names is missing", validate(acc=lambda tmp: _write(tmp / "acc.yaml", (
        f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {tmp}/no.json\n"))),
        "no.json"),
    Case("accelerate", "file that is missing", validate(acc=str(ACC / "nope.yaml")), "does not exist"),
    Case("accelerate", "accumulation that disagrees", validate(acc=_acc_yaml(
        "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 2\n"
        "  gradient_accumulation_steps: 4\n")), "gradient_accumulation_steps"),
    Case("accelerate", "the recipe config given as the Accelerate yaml", validate(acc=lambda tmp: str(tmp / "c.yaml")),
         "llmkit recipe config"),
    Case("accelerate", "an FSDP config", validate(acc=_acc_yaml("distributed_type: FSDP\nnum_processes: 2\n")),
         "FSDP"),
    # ---- the environment a launcher (or a stale shell) left
    Case("env", "WORLD_SIZE a word", validate(), "WORLD_SIZE", env={"WORLD_SIZE": "two"}),
    Case("env", "W&B with no login", validate(None, "--train.report_to", "[tensorboard, wandb]"),
         "train.report_to has wandb, but no W&B credentials",
         env={"HOME": "/nonexistent-home", "WANDB_MODE": "online", "WANDB_API_KEY": ""}),
    Case("env", "a tracker that is not installed", validate(None, "--train.report_to", "aim"),
         "the aim package is not installed: pip install aim"),
    Case("config", "an output dir that is a dangling symbolic link", validate(lambda c, t: (
        os.symlink(t / "gone", t / "link"), c["output"].update(output_dir=str(t / "link" / "run")))),
        "is a symbolic link to"),
    Case("config", "too many rows to explain", validate(None, "--output.explain_rows", "5000"),
         "output.explain_rows"),
    Case("config", "a tracker name with a typo", validate(None, "--train.report_to", "[wandb, tensorbord]"),
         "unknown tracker 'tensorbord'"),
    Case("env", "accumulation env not a number", validate(), "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
         env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "four"}),
    Case("env", "clipping env not a number", validate(), "ACCELERATE_GRADIENT_CLIPPING",
         env={"ACCELERATE_GRADIENT_CLIPPING": "high"}),
    Case("env", "ZeRO stage env a word", validate(), "ACCELERATE_DEEPSPEED_ZERO_STAGE",
         env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "x"}),
    Case("env", "unknown mixed precision env", validate(), "ACCELERATE_MIXED_PRECISION",
         env={"ACCELERATE_MIXED_PRECISION": "fp8"}),
    # ---- data files and folders
    Case("data", "latin-1 CSV", validate(_files(train=("tr.csv", _csv(GOOD[:2] + [("caf\xe9 film", "pos")] + GOOD[2:])
                                                        .encode("latin-1")), validation=("va.csv", _csv(VALID)))),
         "UTF-8"),
    Case("data", "UTF-8 BOM CSV (works)", validate(_files(train=("tr.csv", "\ufeff" + _csv(GOOD)),
                                                          validation=("va.csv", _csv(VALID)))), None),
    Case("data", "UTF-8 BOM jsonl (works)", validate(_files(
        train=("tr.jsonl", "\ufeff" + _jsonl(GOOD)), validation=("va.jsonl", _jsonl(VALID)))), None),
    Case("data", "CRLF CSV (works)", validate(_files(train=("tr.csv", _csv(GOOD, "\r\n")),
                                                     validation=("va.csv", _csv(VALID, "\r\n")))), None),
    Case("data", "folder with [1] in its name (works)", validate(_folder("data[1]")), None),
    Case("data", "folder with * and ? in its name (works)", validate(_folder("my*data?")), None),
    Case("data", "file with [x] in its name (works)", validate(_files(train=("tr[x].csv", _csv(GOOD)),
                                                                      validation=("va.csv", _csv(VALID)))), None),
    Case("data", "blank label (rows must all be good)", validate(
        _files(train=("tr.csv", _csv(GOOD[:3] + [("a moving story", "")] + GOOD[3:])),
               validation=("va.csv", _csv(VALID))), "--data.drop_bad_rows", "false"), "row 3"),
    Case("data", "blank int label names the right row", validate(
        _files(train=("tr.csv", _csv([("good", "1"), ("bad", "0"), ("fine", ""), ("dull", "0")])),
               validation=("va.csv", _csv([("great", "1"), ("weak", "0")]))), "--data.drop_bad_rows", "false"),
        "row 2"),
    Case("data", "NaN label", validate(
        _files(train=("tr.csv", _csv([("good", "1"), ("bad", "0"), ("fine", "nan"), ("dull", "0")])),
               validation=("va.csv", _csv([("great", "1"), ("weak", "0")]))), "--data.drop_bad_rows", "false"),
        "row 2"),
    Case("data", "labels mixing ints and strings", validate(_files(
        train=("tr.jsonl", _jsonl([("good", 1), ("bad", "neg"), ("fine", 1), ("dull", 0)])),
        validation=("va.jsonl", _jsonl([("ok", 1), ("no", 0)])))), "mix"),
    Case("data", "labels mixing digits and words in a CSV", validate(_files(
        train=("tr.csv", _csv([("good", "1"), ("bad", "neg"), ("fine", "1"), ("dull", "0")])),
        validation=("va.csv", _csv([("great", "1"), ("weak", "0")])))), "mix"),
    Case("data", "fractional labels", validate(_files(
        train=("tr.csv", _csv([("good", "1"), ("bad", "0.5"), ("fine", "1"), ("dull", "0")])),
        validation=("va.csv", _csv([("great", "1"), ("weak", "0")])))), "0.5"),
    Case("data", "boolean labels", validate(_files(
        train=("tr.jsonl", _jsonl([("good", True), ("bad", False)])), validation=("va.jsonl", _jsonl([("ok", True)])))),
        "label"),
    Case("data", "one class only", validate(_files(train=("tr.csv", _csv([(t, "pos") for t, _ in GOOD])),
                                                   validation=("va.csv", _csv(VALID)))), "at least 2"),
    Case("data", "empty validation file", validate(_files(train=("tr.csv", _csv(GOOD)), validation=("va.csv", ""))),
         "split 'validation' is empty"),
    Case("data", "header-only CSV", validate(_files(train=("tr.csv", _csv(GOOD)), validation=("va.csv", "text,label\n"))),
         "validation"),
    Case("data", "a broken jsonl line", validate(_files(
        train=("tr.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n'),
        validation=("va.jsonl", '{"text": "ok", "label": "pos"}\n'))), "tr.jsonl"),
    Case("data", "a CSV row with an extra field", validate(_files(
        train=("tr.csv", "text,label\ngood,pos\nbad,neg,extra,more\nfine,pos\n"), validation=("va.csv", _csv(VALID)))),
        "tr.csv"),
    Case("data", "a parquet file that is not parquet", validate(_files(
        train=("tr.parquet", b"PAR1 this is not a parquet file"), validation=("va.parquet", b"garbage"))),
        "parquet"),
    Case("data", "unseen label in validation", validate(_files(train=("tr.csv", _csv(GOOD)),
                                                               validation=("va.csv", _csv([("meh film", "meh")])))),
         "'meh'"),
    Case("data", "a label column that is missing", validate(None, "--data.label_column", "sentiment"),
         "no column 'sentiment'"),
    Case("data", "a dataset folder that is missing", validate(lambda c, t: c["data"].update(dataset=str(t / "nope"))),
         "does not exist"),
    Case("data", "a folder without data files", validate(lambda c, t: (_mk(t / "empty_data"), c["data"].update(
        dataset=str(t / "empty_data")))), "holds no"),
    Case("data", "texts that are numbers (works)", validate(_files(
        train=("tr.csv", _csv([("12", "pos"), ("7", "neg"), ("30", "pos"), ("4", "neg")])),
        validation=("va.csv", _csv([("5", "pos"), ("1", "neg")])))), None),
    Case("data", "an empty train file", validate(_files(train=("tr.jsonl", ""), validation=("va.jsonl", _jsonl(VALID)))),
         "split 'train' is empty"),
    Case("data", "a text column that is missing", validate(None, "--data.text_column", "review"),
         "split 'train' has no column 'review'"),
    Case("data", "a data file that is a folder", validate(lambda c, t: (_mk(t / "tr.csv"), _files(
        validation=("va.csv", _csv(VALID)))(c, t), c["data"]["data_files"].update(train=str(t / "tr.csv")))),
        "is a folder"),
    Case("data", "prompts that fill max_length", _lm(None, "--data.max_length", "4"), "no row of the train split"),
    Case("data", "one prompt that fills max_length", _lm(_one_long_prompt, "--data.max_length", "12",
                                                          "--data.drop_bad_rows", "false"), "train row 1"),
    Case("data", "prompt without a response column", _lm(lambda c, t: c["data"].update(response_column=None)),
         "must be set together"),
    Case("config", "an unknown data.format", _lm(None, "--data.format", "jsonl"), "data.format"),
    Case("config", "data.format in the classification recipe", validate(lambda c, t: c["data"].update(
        format="alpaca")), "recipes/classification.py does not read it"),
    Case("config", "explanations asked of a causal LM that classifies nothing", _lm(None, "--output.explain_rows", "4"),
         "output.explain_rows is set, but recipes/causal_lm.py without data.prompt_template does not read it"),
    Case("config", "an int8 ONNX copy asked of a causal LM", _lm(None, "--output.quantize", "[onnx-int8]"),
         "onnx-int8 is for classifiers and this causal_lm run's model is a causal lm"),
    Case("config", "a GGUF copy of a model whose tokenizer GGUF cannot hold", _lm(None, "--output.quantize",
                                                                               "[gguf-q8_0]"),
         "output.quantize asks for gguf-q8_0, but the tokenizer"),
    Case("config", "a quantized format llmkit does not write", validate(None, "--output.quantize", "[int3]"),
         "config key 'output.quantize' lists 'int3'; llmkit writes onnx-int8"),
    Case("config", "a label column in a causal-LM run without label words", _lm(
        lambda c, t: c["data"].update(label_column="sentiment")), "data.label_column is set, but"),
    Case("data", "an alpaca row without output", _lm(_sft_rows([{"instruction": "hi", "output": "hi"},
                                                                {"instruction": "hi", "output": None}])),
         "split 'train' row 1 (alpaca): alpaca 'output' must be a string"),
    Case("data", "a ShareGPT turn from an unknown role", _lm(_sft_rows([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hi"}]}])),
         "ShareGPT turn 1 is from 'bot'"),
    Case("data", "columns that fit no format", _lm(_sft_rows([{"question": "hi", "answer": "hi"}])),
         "fit no format"),
    Case("data", "alpaca rows (works)", _lm(_sft_rows([{"instruction": "hi", "input": "", "output": "hi"}] * 4)),
         None),
    Case("data", "a UTF-16 CSV (Excel's Unicode text)", validate(_files(
        train=("tr.csv", _csv(GOOD).encode("utf-16")), validation=("va.csv", _csv(VALID)))), "UTF-8"),
    Case("data", "a semicolon-separated CSV", validate(_files(
        train=("tr.csv", _csv(GOOD).replace(",", ";")), validation=("va.csv", _csv(VALID).replace(",", ";")))),
        "separated by ';'"),
    Case("data", "a JSON array file (works)", validate(_files(
        train=("tr.json", json.dumps([{"text": t, "label": lab} for t, lab in GOOD])),
        validation=("va.json", json.dumps([{"text": t, "label": lab} for t, lab in VALID])))), None),
    Case("data", "texts that are lists", validate(_files(
        train=("tr.jsonl", "".join(json.dumps({"text": t.split(), "label": lab}) + "\n" for t, lab in GOOD)),
        validation=("va.jsonl", "".join(json.dumps({"text": t.split(), "label": lab}) + "\n" for t, lab in VALID)))),
        "not text"),
    Case("data", "a datasets cache that is a file", validate(), "HF_DATASETS_CACHE", fresh=True,
         env={"HF_DATASETS_CACHE": "/etc/hostname"}),
    Case("data", "label names with one class in the train split", validate(_files(
        train=("tr.csv", _csv([(t, "pos") for t, _ in GOOD])), validation=("va.csv", _csv(VALID))),
        "--data.label_names", "[neg, pos]"), "label(s) ['neg'] have no training row (train split: neg 0, pos"),
    Case("data", "int labels with a class no train row holds", validate(_files(
        train=("tr.jsonl", "".join(json.dumps({"text": t, "label": 2 * (lab == "pos")}) + "\n" for t, lab in GOOD)),
        validation=("va.jsonl", "".join(json.dumps({"text": t, "label": 0}) + "\n" for t, _ in VALID)))),
        "label(s) ['1'] have no training row"),
    Case("data", "a data folder with notes.txt and a README beside the splits (works)", validate(
        lambda c, t: (_folder("with_notes")(c, t), _write(t / "with_notes" / "notes.txt", "my notes\n"),
                      _write(t / "with_notes" / "README.md", "# data\n"), _write(t / "with_notes" / "LICENSE", "MIT\n"))),
        None),
    # ---- model and tokenizer folders
    Case("model", "a model path that does not exist", validate(lambda c, t: c["model"].update(
        name_or_path=str(t / "nope"))), "does not exist (neither a local dir nor a Hub id)"),
    Case("model", "a folder that is not a model", validate(lambda c, t: (_mk(t / "empty"), c["model"].update(
        name_or_path=str(t / "empty")))), "is a directory without config.json"),
    Case("model", "a model folder without weights", validate(lambda c, t: (
        _write(t / "noweights" / "config.json", (Path(c["model"]["name_or_path"]) / "config.json").read_text()),
        c["model"].update(name_or_path=str(t / "noweights")))), "weights"),
    Case("model", "a weights file cut short (an interrupted copy)", validate(lambda c, t: (
        _truncated_copy(Path(c["model"]["name_or_path"]), t / "cut"), c["model"].update(name_or_path=str(t / "cut")))),
        "model.safetensors is cut short"),
    Case("model", "a model folder without tokenizer files", validate(lambda c, t: (
        _mk(t / "notok"), [(t / "notok" / f.name).write_bytes(f.read_bytes()) for f in Path(c["model"]["name_or_path"])
                           .iterdir() if f.name in ("config.json", "model.safetensors")],
        c["model"].update(name_or_path=str(t / "notok")))), "holds no tokenizer files"),
    Case("model", "config.json that is not JSON", validate(lambda c, t: (
        _write(t / "badcfg" / "config.json", "{ oops"), c["model"].update(name_or_path=str(t / "badcfg")))),
        "config.json"),
    Case("model", "config.json without model_type", validate(lambda c, t: (
        _write(t / "notype" / "config.json", '{"hidden_size": 8}'), c["model"].update(name_or_path=str(t / "notype")))),
        "config.json"),
    Case("model", "a tokenizer folder that is missing", validate(lambda c, t: c["model"].update(
        tokenizer=str(t / "no_tok"))), "no_tok"),
    Case("model", "a tokenizer folder without tokenizer files", validate(lambda c, t: (
        _mk(t / "empty_tok"), c["model"].update(tokenizer=str(t / "empty_tok")))), "empty_tok"),
    Case("model", "a Hub id while offline", validate(lambda c, t: c["model"].update(name_or_path="nobody/nothing")),
         "nobody/nothing", fresh=True),
    Case("model", "a tokenizer bigger than the model's vocabulary", validate(lambda c, t: c["model"].update(
        tokenizer=_big_tokenizer(t))), "vocabulary"),
    Case("model", "a LoRA adapter folder as the model", validate(lambda c, t: (
        _write(t / "adapter" / "adapter_config.json", '{"peft_type": "LORA", "base_model_name_or_path": "x"}'),
        c["model"].update(name_or_path=str(t / "adapter")))), "adapter"),
    Case("model", "a weights file instead of its folder", validate(lambda c, t: c["model"].update(
        name_or_path=str(Path(c["model"]["name_or_path"]) / "model.safetensors"))), "folder"),
    # ---- checkpoints
    Case("checkpoint", "resume from a folder that is not a checkpoint", validate(lambda c, t: (
        _mk(t / "notckpt"), c["checkpoint"].update(resume_from=str(t / "notckpt")) if "checkpoint" in c else
        c.update(checkpoint={"resume_from": str(t / "notckpt")}))), "notckpt"),
    Case("checkpoint", "resume latest with nothing to resume", validate(
        lambda c, t: c.update(checkpoint={"resume_from": "latest"})), "resume"),
    Case("checkpoint", "resume from the checkpoints folder itself", validate(lambda c, t: (
        _mk(t / "old" / "checkpoints" / "step-2"), c.update(checkpoint={"resume_from": str(t / "old" / "checkpoints")}))),
        "step-<n>"),
    # ---- the Hub
    Case("hub", "push at the end with no token", validate(lambda c, t: c["output"].update(
        push_to_hub=True, hub_model_id="alice/x")), "needs a token", fresh=True,
        env={"HF_TOKEN": "", "HF_HOME": "/nonexistent-hf-home"}),
    Case("hub", "a repo id with a space", validate(lambda c, t: c["output"].update(
        push_to_hub=True, hub_model_id="alice/my model")), "output.hub_model_id"),
    # ---- the targets of eval, generate, push, report, estimate-memory
    Case("target", "eval of a folder that is missing", lambda t, a: ["eval", str(t / "nope"), "--data",
                                                                     str(a["data"])], "nope"),
    Case("target", "eval of a split the data lacks", lambda t, a: ["eval", str(a["bert"]), "--data", str(a["data"]),
                                                                   "--split", "dev"], "dev"),
    Case("target", "eval with batch size 0", lambda t, a: ["eval", str(a["bert"]), "--data", str(a["data"]),
                                                           "--batch-size", "0"], "--batch-size"),
    Case("target", "generate from a folder that is missing", lambda t, a: ["generate", str(t / "nope"), "--prompt",
                                                                           "hi"], "nope"),
    Case("target", "generate from a classifier", lambda t, a: ["generate", str(a["bert"]), "--prompt", "hi"],
         "causal"),
    Case("target", "push of a folder that is not a run", lambda t, a: ["push", str(_mk(t / "empty")), "alice/x",
                                                                       "--dry-run"], "neither a run"),
    # every command on a damaged run folder: exit 2 and one line, as for training
    Case("target", "report of a run with a damaged predictions line", lambda t, a: ["report", str(_damaged_run(t, a))],
         "predictions_test.jsonl line 2 is not JSON"),
    Case("target", "eval of an export whose weights are cut short", lambda t, a: [
        "eval", str(_damaged_run(t, a) / "final"), "--data", str(a["data"])], "model.safetensors is cut short"),
    Case("target", "explain with an export whose weights are cut short", lambda t, a: [
        "explain", str(_damaged_run(t, a) / "final"), "--text", "a film"], "model.safetensors is cut short"),
    Case("target", "push of a run whose weights are cut short", lambda t, a: [
        "push", str(_damaged_run(t, a)), "alice/x", "--dry-run", "--output", str(t / "staged")], "cut short"),
    Case("target", "report of a folder that is not a run", lambda t, a: ["report", str(_mk(t / "empty"))], "empty"),
    Case("target", "push to a branch name with '..'", lambda t, a: ["push", str(_mk(t / "empty")), "alice/x",
                                                                    "--revision", "a..b", "--dry-run"], "--revision"),
    Case("target", "estimate-memory of a missing model", lambda t, a: ["estimate-memory", "--model", str(t / "nope"),
                                                                       "--zero-stage", "2"], "nope"),
]


@dataclass
class Outcome:
    code: int | None
    errors: list[str]  # the `llmkit: error:` lines
    crash: str  # a traceback, when the command raised
    changed: list[str]  # files created, changed or removed by the refused command
    stderr: str


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _changed(before: dict, tmp: Path, assets: dict) -> list[str]:
    after = {name: _snapshot(folder) for name, folder in {"tmp": tmp, **assets}.items()}
    return sorted(f"{where}/{name}" for where in before for name in set(before[where]) | set(after[where])
                  if before[where].get(name) != after[where].get(name))


def run(case: Case, tmp: Path, assets: dict) -> Outcome:
    """Build the case's files in `tmp`, run `llmkit <args>` in this process, and report what happened."""
    args = case.build(tmp, assets)
    before = {name: _snapshot(folder) for name, folder in {"tmp": tmp, **assets}.items()}
    if case.fresh:
        proc = subprocess.run([sys.executable, "-m", "llmkit.cli", *args], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **case.env}, timeout=300)
        crash = proc.stderr if "Traceback (most recent call last)" in proc.stderr else ""
        return Outcome(proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith("llmkit: error:")],
                       crash, _changed(before, tmp, assets), proc.stderr)
    try:
        proc = cli(args, env=case.env)
        code, text, crash = proc.returncode, proc.stderr, ""
    except BaseException:  # noqa: BLE001 - an escaped exception is what the battery looks for
        code, text, crash = 1, "", traceback.format_exc()
    return Outcome(code, [line for line in text.splitlines() if line.startswith("llmkit: error:")], crash,
                   _changed(before, tmp, assets), text)


def verdict(case: Case, got: Outcome) -> str | None:
    """None when the case is clean, else what is wrong."""
    if got.crash:
        return "traceback: " + got.crash.strip().splitlines()[-1]
    if case.expect is None:
        return None if got.code == 0 else f"a legitimate input was refused (exit {got.code}): {got.errors or got.stderr[-300:]}"
    if got.code != 2:
        return f"exit {got.code}, not 2" + (" (passed)" if got.code == 0 else "")
    if len(got.errors) != 1:
        return f"{len(got.errors)} error lines"
    if case.expect not in got.errors[0]:
        return f"message lacks {case.expect!r}: {got.errors[0]}"
    if got.changed:
        return f"changed files: {got.changed[:3]}"
    return None
