"""The typed run config: YAML file + `--key value` overrides, validated before any process group starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit.config_checks import check_values
from llmkit.errors import LlmkitError
from llmkit.typed import build, did_you_mean, hints, read_yaml


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "asset:minilm"  # Hub id, local dir, or asset:<name> (see `llmkit assets`)
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None  # a Hub branch, tag or commit of the model
    from_scratch: bool = False  # random init from the model's config instead of its weights
    trust_remote_code: bool = False  # run the model repo's own Python code (only for repos you trust)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    dtype: str | None = None  # the dtype weights load in: float32 | bfloat16 | float16 (default: float32)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (CUDA + flash-attn) | flex_attention


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False  # train peft LoRA adapters (and a classifier head in full) instead of every weight
    r: int = 16  # adapter rank
    alpha: int = 32  # adapter scale: updates are multiplied by alpha / r
    dropout: float = 0.05  # dropout on the adapter inputs
    target_modules: list[str] | None = None  # default: chosen per architecture (see llmkit.model)
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes), the adapters on top


@dataclass(frozen=True)
class MixtureSource:
    """One source of data.mixture: where its rows are and how to read them; unset keys come from data.*."""
    weight: float  # the share of training examples drawn from this source (weights are normalised)
    dataset: str | None = None  # as data.dataset, for this source
    dataset_config: str | None = None  # as data.dataset_config
    data_files: dict[str, str] | None = None  # as data.data_files
    train_split: str | None = None  # as data.train_split
    eval_split: str | None = None  # its validation rows join the run's validation split when it has this split
    format: str | None = None  # as data.format
    text_column: str | None = None  # as data.text_column
    prompt_column: str | None = None  # as data.prompt_column
    response_column: str | None = None  # as data.response_column
    messages_column: str | None = None  # as data.messages_column


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = None  # Hub id, local dir or file, or asset:<name>
    dataset_config: str | None = None  # Hub subset, e.g. "sst2" for "glue"
    data_files: dict[str, str] | None = None  # split -> local csv/json/jsonl/parquet file
    train_split: str = "train"  # the split trained on
    eval_split: str = "validation"  # the split evaluated during training and for the best checkpoint
    test_split: str | None = "test"  # evaluated once at the end; null for none
    text_column: str = "text"  # classifiers: the input text
    text_pair_column: str | None = None  # classifiers: a second text (pairs: NLI, paraphrase)
    label_column: str = "label"  # classifiers: the label (names or ids)
    label_names: list[str] | None = None  # fixes the label order; default: from the data
    max_length: int = 128  # tokens per row (longer rows are cut); causal-LM text: the block size
    clean_text: bool = False  # unicode NFKC, strip HTML tags and URLs, squeeze whitespace
    drop_bad_rows: bool = True  # rows with empty/None text or no label: dropped with a count (false: an error)
    group_by_length: bool = True  # batches of similar length: little padding
    max_train_samples: int | None = None  # use only the first N training rows (after the shuffle)
    max_eval_samples: int | None = None  # use only the first N rows of each evaluation split
    # causal LM rows (llmkit.data.formats): auto (from the columns) | text (packed into blocks of max_length
    # tokens) | prompt_response | messages | alpaca | sharegpt; the last four train on the responses only
    format: str = "auto"
    # the column keys of prompt_response (default prompt / response) and messages / sharegpt (messages /
    # conversations); setting them under format auto picks that format
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    # several sources, interleaved by weight with train.seed (instead of data.dataset / data.data_files); each
    # source is read like data.dataset with its own keys over these
    mixture: list[MixtureSource] | None = None
    # read the train split as a stream (Hub or local): each rank its own share, tokenized and packed on the fly,
    # in stream order (no shuffle), resumed at the exact row; needs train.max_steps
    streaming: bool = False
    # prompt/response and chat rows packed padding-free: each batch's rows end to end, position_ids restarting per
    # row, no attention across rows (plain text is always packed, into blocks)
    packing: bool = False
    # generative classification: each row becomes prompt_template (with {text}, and {text_pair} for pairs) and
    # the response is its label word; evaluation scores every label word by log-likelihood
    prompt_template: str | None = None
    label_words: list[str] | None = None  # one per label, in label order; default: the label names


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42  # data order, initialisation and dropout
    epochs: float = 1.0  # passes over the train split (fractions allowed)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    per_device_batch_size: int = 16  # rows per micro-batch on each rank
    eval_batch_size: int = 64  # rows per evaluation batch on each rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step on each rank
    learning_rate: float = 5e-5  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases and norms)
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_epsilon: float = 1e-8  # AdamW denominator epsilon
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06  # share of the steps with a linear warm-up
    max_grad_norm: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    eval_every_steps: int | None = None  # also evaluate every N optimizer steps (always at epoch end)
    logging_steps: int = 10  # log the train scalars every N optimizer steps
    num_threads: int | None = None  # torch CPU threads per rank; default: cores / local ranks
    class_weights: list[float] | str | None = None  # classifiers: null | balanced | [w0, w1, ...] in label order
    loss_scale_patience: int = 50  # fp16: stop after this many steps with the loss scale at its minimum
    # how long a rank waits for the others in any collective (every process group): after training, rank 0 checks
    # the export, merges LoRA and explains rows in fresh processes while the others wait (a 7B model: many minutes)
    collective_timeout_minutes: int = 120
    sample_prompts: list[str] | None = None  # causal LM: greedy completions logged at every eval
    sample_max_new_tokens: int = 48  # tokens generated per sample prompt
    # speed switches (bench/README.md has each one's measured effect)
    adamw_impl: str = "fused"  # fused (one kernel for all params; ~6x faster on CPU) | foreach | loop
    dataloader_workers: int = 0  # worker processes per rank for collation (0: in the training process)
    pin_memory: bool | None = None  # page-locked host batches; default: on with a GPU
    torch_compile: bool = False  # torch.compile each repeated block (inductor, dynamic shapes); slow first steps
    profile_steps: int = 0  # > 0: torch.profiler trace of this many steps (after 3 warm-up) to <output_dir>/profile
    # experiment trackers (Accelerate's): tensorboard | wandb | mlflow | trackio | comet_ml | aim | clearml |
    # dvclive | swanlab, or none; the resolved config goes to each as hyperparameters
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None  # the trackers' run name; default: output_dir's folder name
    tracker_tags: list[str] | None = None  # tags on the run (W&B, MLflow, Comet, SwanLab)
    tracker_project: str = "llmkit"  # W&B project, MLflow experiment, Trackio / Comet / SwanLab project


@dataclass(frozen=True)
class DeepSpeedConfig:
    config_file: str | None = None  # DeepSpeed JSON; default: the one the Accelerate config names
    zero_stage: int | None = None  # when set, must agree with the JSON


@dataclass(frozen=True)
class CheckpointConfig:
    save_every_steps: int | None = None  # write checkpoints/step-<n> every N optimizer steps
    save_every_epoch: bool = False  # also write a checkpoint at each epoch end
    keep_last: int | None = 2  # newest checkpoints kept (None keeps all)
    keep_best: int = 0  # also keep this many best ones by best_metric (from the evals at checkpoint steps)
    best_metric: str = "f1"  # an eval metric (loss and perplexity: lower is better)
    resume_from: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    new_global_batch: bool = False  # a resume takes this launch's ranks x accumulation, not the checkpoint's


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str = "outputs/run"  # the run's folder: export, reports, checkpoints, logs
    overwrite_output_dir: bool = False  # replace an earlier llmkit run (kept until the new export is in place)
    push_to_hub: bool = False  # push final/ + report + model card at the end; token: HF_TOKEN or `hf auth login`
    hub_model_id: str | None = None  # <user or org>/<name>
    hub_private: bool = True  # create the Hub repo private
    hub_revision: str | None = None  # a branch; default main
    hub_strategy: str = "end"  # end | every_save (each checkpoint too, uploaded in the background)
    hub_push_merged: bool = False  # LoRA runs: also push the merged model (under merged/)
    # reload final/ in a fresh CPU process and require the run's logits (LoRA runs always do: the merge runs
    # there); false: only the no-empty-tensor check, for a model too big to load a second time in host memory
    verify_export: bool = True
    explain_rows: int = 8  # classifiers, label-word LMs: report rows explained word by word (mistakes first); 0: none
    hub_license: str | None = None  # model card license; default: the base model's when known, else "other"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field."""
        return dataclasses.asdict(self)

    def dump(self) -> str:
        """The config as YAML (the resolved config of a run)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(self.dump())


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise LlmkitError(f"unexpected argument '{arg}': overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LlmkitError(f"override '{arg}' has no value: write {arg} VALUE")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def _full_key(key: str) -> tuple[str, str]:
    """'train.learning_rate' -> (train, learning_rate); a bare leaf name works when it is unique."""
    sections = hints(Config)
    if "." in key:
        section, leaf = key.split(".", 1)
        return section, leaf
    owners = [s for s, cls in sections.items() if key in hints(cls)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise LlmkitError(f"override '--{key}' is ambiguous: write one of " + ", ".join(f"--{s}.{key}" for s in owners))
    leaves = [f"{s}.{k}" for s, cls in sections.items() for k in hints(cls)]
    raise LlmkitError(f"unknown config key '{key}'{did_you_mean(key, leaves)}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--section.key value` overrides, validate, return the typed config."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path, "config file")
        if not isinstance(raw, dict):
            raise LlmkitError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for key, text in _split_overrides(overrides or []):
        section, leaf = _full_key(key)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise LlmkitError(f"config section '{section}' must be a mapping")
        current[leaf] = value
    config = build(raw, Config)
    check_values(config)
    return config
