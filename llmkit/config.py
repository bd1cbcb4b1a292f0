"""The typed run config: YAML file + `--key value` overrides, validated before any process group starts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit import metrics
from llmkit.errors import LlmkitError
from llmkit.typed import build, did_you_mean, hints, read_yaml


@dataclass
class ModelConfig:
    name_or_path: str = "asset:minilm"  # Hub id, local dir, or asset:<name> (see `llmkit assets`)
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None
    from_scratch: bool = False  # random init from the model's config instead of its weights
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    dtype: str | None = None  # the dtype weights load in: float32 | bfloat16 | float16 (default: float32)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (CUDA + flash-attn) | flex_attention


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # default: chosen per architecture (see llmkit.model)
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes), the adapters on top


# data.format: how causal-LM rows are read (llmkit.data.formats)
DATA_FORMATS = ("auto", "text", "prompt_response", "messages", "alpaca", "sharegpt")


@dataclass
class MixtureSource:
    """One source of data.mixture: where its rows are and how to read them; unset keys come from data.*."""
    weight: float  # the share of training examples drawn from this source (weights are normalised)
    dataset: str | None = None
    dataset_config: str | None = None
    data_files: dict[str, str] | None = None
    train_split: str | None = None
    eval_split: str | None = None  # its validation rows join the run's validation split when it has this split
    format: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None


@dataclass
class DataConfig:
    dataset: str | None = None  # Hub id, local dir or file, or asset:<name>
    dataset_config: str | None = None  # Hub subset, e.g. "sst2" for "glue"
    data_files: dict[str, str] | None = None  # split -> local csv/json/jsonl/parquet file
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = "test"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None  # fixes the label order; default: from the data
    max_length: int = 128
    clean_text: bool = False  # unicode NFKC, strip HTML tags and URLs, squeeze whitespace
    drop_bad_rows: bool = True  # rows with empty/None text or no label: dropped with a count (false: an error)
    group_by_length: bool = True  # batches of similar length: little padding
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
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


@dataclass
class TrainConfig:
    seed: int = 42
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    per_device_batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    eval_every_steps: int | None = None  # also evaluate every N optimizer steps (always at epoch end)
    logging_steps: int = 10
    num_threads: int | None = None  # torch CPU threads per rank; default: cores / local ranks
    class_weights: list[float] | str | None = None  # classifiers: null | balanced | [w0, w1, ...] in label order
    loss_scale_patience: int = 50  # fp16: stop after this many steps with the loss scale at its minimum
    sample_prompts: list[str] | None = None  # causal LM: greedy completions logged at every eval
    sample_max_new_tokens: int = 48
    # speed switches (bench/README.md has each one's measured effect)
    adamw_impl: str = "fused"  # fused (one kernel for all params; ~6x faster on CPU) | foreach | loop
    dataloader_workers: int = 0  # worker processes per rank for collation (0: in the training process)
    pin_memory: bool | None = None  # page-locked host batches; default: on with a GPU
    torch_compile: bool = False  # torch.compile each repeated block (inductor, dynamic shapes); slow first steps
    profile_steps: int = 0  # > 0: torch.profiler trace of this many steps (after 3 warm-up) to <output_dir>/profile


@dataclass
class DeepSpeedConfig:
    config_file: str | None = None  # DeepSpeed JSON; default: the one the Accelerate config names
    zero_stage: int | None = None  # when set, must agree with the JSON


@dataclass
class CheckpointConfig:
    save_every_steps: int | None = None  # write checkpoints/step-<n> every N optimizer steps
    save_every_epoch: bool = False
    keep_last: int | None = 2  # newest checkpoints kept (None keeps all)
    keep_best: int = 0  # also keep this many best ones by best_metric (from the evals at checkpoint steps)
    best_metric: str = "f1"  # an eval metric (loss and perplexity: lower is better)
    resume_from: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    new_global_batch: bool = False  # a resume takes this launch's ranks x accumulation, not the checkpoint's


@dataclass
class OutputConfig:
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    push_to_hub: bool = False  # push final/ + report + model card at the end; token: HF_TOKEN or `hf auth login`
    hub_model_id: str | None = None  # <user or org>/<name>
    hub_private: bool = True
    hub_revision: str | None = None  # a branch; default main
    hub_strategy: str = "end"  # end | every_save (each checkpoint too, uploaded in the background)
    hub_push_merged: bool = False  # LoRA runs: also push the merged model (under merged/)
    hub_license: str | None = None  # model card license; default: the base model's when known, else "other"


@dataclass
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SCHEDULERS = ("linear", "cosine", "constant")
ADAMW_IMPLS = ("fused", "foreach", "loop")


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


def check_repo_id(repo_id: str | None, key: str = "output.hub_model_id") -> str:
    """A Hub repo id of the form <user or org>/<name>; a clear error otherwise."""
    if not repo_id or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise LlmkitError(f"{key} must look like <user or org>/<name> (letters, digits, . _ -), got {repo_id!r}")
    return repo_id


BRANCH = re.compile(r"^(?![-/.])[A-Za-z0-9._/-]+(?<![/.])$")  # a subset of git's ref rules, enough for the Hub


def check_revision(revision: str | None, key: str = "output.hub_revision") -> str | None:
    """A branch name git and the Hub accept (letters, digits, . _ - /; no '..', no leading or trailing . or /)."""
    if revision is not None and (not BRANCH.match(revision) or ".." in revision or revision.endswith(".lock")):
        raise LlmkitError(f"{key} must be a branch name (letters, digits, . _ - /, no spaces or '..'), got "
                          f"{revision!r}")
    return revision


def check_values(cfg: Config) -> None:
    """Reject impossible values; every message names the key."""
    t, d = cfg.train, cfg.data

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise LlmkitError(f"config key '{key}' {why}")

    need(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    need(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be > 0 when set, got {t.max_steps}")
    need(t.per_device_batch_size >= 1, "train.per_device_batch_size", f"must be >= 1, got {t.per_device_batch_size}")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    need(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
         f"must be >= 1, got {t.gradient_accumulation_steps}")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    need(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2", "must be in [0, 1)")
    need(t.adam_epsilon > 0, "train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    need(t.lr_scheduler in SCHEDULERS, "train.lr_scheduler",
         f"must be one of {', '.join(SCHEDULERS)}, got '{t.lr_scheduler}'")
    need(t.eval_every_steps is None or t.eval_every_steps > 0, "train.eval_every_steps", "must be > 0 when set")
    need(t.logging_steps >= 1, "train.logging_steps", f"must be >= 1, got {t.logging_steps}")
    need(t.num_threads is None or 1 <= t.num_threads <= 4096, "train.num_threads",
         f"must be in [1, 4096] when set (threads per rank), got {t.num_threads}")
    need(t.sample_max_new_tokens >= 1, "train.sample_max_new_tokens", f"must be >= 1, got {t.sample_max_new_tokens}")
    need(t.adamw_impl in ADAMW_IMPLS, "train.adamw_impl",
         f"must be one of {', '.join(ADAMW_IMPLS)}, got '{t.adamw_impl}'")
    need(t.dataloader_workers >= 0, "train.dataloader_workers", f"must be >= 0, got {t.dataloader_workers}")
    need(t.profile_steps >= 0, "train.profile_steps", f"must be >= 0, got {t.profile_steps}")
    w = t.class_weights
    need(w is None or w == "balanced" or (isinstance(w, list) and len(w) >= 2 and all(x > 0 for x in w)),
         "train.class_weights", f"must be null, balanced, or a list of positive weights (one per label), got {w!r}")
    need(t.loss_scale_patience >= 1, "train.loss_scale_patience", f"must be >= 1, got {t.loss_scale_patience}")

    need(bool(cfg.model.name_or_path), "model.name_or_path", "must name a Hub id, a local dir or asset:<name>")
    need(cfg.model.dtype in (None, "float32", "bfloat16", "float16"), "model.dtype",
         f"must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    need(cfg.model.attn_implementation in (None, "eager", "sdpa", "flash_attention_2", "flex_attention"),
         "model.attn_implementation", f"must be eager, sdpa, flash_attention_2 or flex_attention, got "
         f"{cfg.model.attn_implementation!r}")
    if d.streaming:
        need(cfg.train.max_steps is not None, "data.streaming", "needs train.max_steps: a stream has no length "
             "to count epochs by")
        need(d.mixture is None and d.prompt_template is None, "data.streaming", "works with one dataset of text, "
             "prompt/response, chat, alpaca or ShareGPT rows (not data.mixture or label words yet)")
    need(not (d.packing and d.prompt_template), "data.packing", "applies to prompt/response and chat rows, not "
         "label words (data.prompt_template)")
    if d.mixture is not None:
        need(d.dataset is None and d.data_files is None, "data.mixture",
             "lists the sources: remove data.dataset / data.data_files, or the mixture")
        need(len(d.mixture) >= 2, "data.mixture", "needs at least 2 sources (one source: use data.dataset)")
        need(d.prompt_template is None, "data.mixture", "does not take label words (data.prompt_template)")
        for i, src in enumerate(d.mixture):
            need(src.weight > 0, f"data.mixture[{i}].weight", f"must be > 0, got {src.weight}")
            need((src.dataset is None) != (src.data_files is None), f"data.mixture[{i}]",
                 "needs exactly one of dataset or data_files")
            need(src.format is None or src.format in DATA_FORMATS, f"data.mixture[{i}].format",
                 f"must be one of {', '.join(DATA_FORMATS)}, got {src.format!r}")
    else:
        need(d.dataset is not None or d.data_files is not None, "data.dataset",
             "is missing: set data.dataset (Hub id, local path or asset:<name>) or data.data_files")
    need(d.dataset is None or d.data_files is None, "data.data_files",
         "cannot be used together with data.dataset: pick one")
    need(bool(d.train_split), "data.train_split", "must name the training split")
    need(bool(d.eval_split), "data.eval_split", "must name the evaluation split (e.g. validation)")
    if d.data_files is not None:
        for key, split in (("data.train_split", d.train_split), ("data.eval_split", d.eval_split),
                           ("data.test_split", d.test_split)):
            need(split is None or split in d.data_files, key,
                 f"names split '{split}' but data.data_files only has {sorted(d.data_files)}")
    need(d.max_length >= 2, "data.max_length", f"must be >= 2, got {d.max_length}")
    need(bool(d.text_column), "data.text_column", "must name the text column")
    need(bool(d.label_column), "data.label_column", "must name the label column")
    need(len({d.text_column, d.text_pair_column, d.label_column} - {None}) == 2 + bool(d.text_pair_column),
         "data.text_column", f"'{d.text_column}', data.text_pair_column and data.label_column '{d.label_column}' must "
         "name different columns")
    need(d.label_names is None or len(set(d.label_names)) == len(d.label_names) >= 2, "data.label_names",
         "must list at least 2 distinct labels")
    if d.prompt_template is not None:
        need("{text}" in d.prompt_template, "data.prompt_template",
             "must contain {text}, where each row's text goes (and {text_pair} when data.text_pair_column is set)")
        need(bool(d.text_pair_column) == ("{text_pair}" in d.prompt_template), "data.prompt_template",
             "must contain {text_pair} exactly when data.text_pair_column is set")
        need(not (d.prompt_column or d.response_column or d.messages_column), "data.prompt_template",
             "builds prompts from text_column; it cannot be combined with prompt/response/messages columns")
        need(d.format == "auto", "data.format", "does not apply to label words (data.prompt_template reads "
             "data.text_column); remove it")
    need(d.format in DATA_FORMATS, "data.format", f"must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}")
    if d.label_words is not None:
        need(d.prompt_template is not None, "data.label_words", "needs data.prompt_template (generative labels)")
        need(len(set(d.label_words)) == len(d.label_words) >= 2 and all(w.strip() for w in d.label_words),
             "data.label_words", "must list at least 2 distinct, non-empty words")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}", f"must be >= 1 when set, got {value}")

    lo = cfg.lora
    need(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
    need(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(not lo.load_in_4bit or lo.enabled, "lora.load_in_4bit",
         "needs lora.enabled: true (QLoRA trains LoRA adapters on the 4-bit base)")
    need(not (lo.load_in_4bit and cfg.model.from_scratch), "lora.load_in_4bit",
         "quantizes pretrained weights; a from-scratch model has none to quantize")
    need(lo.target_modules is None or len(lo.target_modules) > 0, "lora.target_modules",
         "must list module names (or be null for the per-architecture default)")

    z = cfg.deepspeed.zero_stage
    need(z is None or z in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {z}")
    if cfg.deepspeed.config_file is not None:
        need(Path(cfg.deepspeed.config_file).is_file(), "deepspeed.config_file",
             f"points to '{cfg.deepspeed.config_file}', which does not exist")
    need(bool(cfg.output.output_dir), "output.output_dir", "must name a directory")
    o = cfg.output
    need(o.hub_strategy in ("end", "every_save"), "output.hub_strategy",
         f"must be end or every_save, got '{o.hub_strategy}'")
    if o.push_to_hub:
        check_repo_id(o.hub_model_id)
    check_revision(o.hub_revision)
    c = cfg.checkpoint
    need(not (c.resume_from and o.overwrite_output_dir), "output.overwrite_output_dir",
         "and checkpoint.resume_from are both set: resume continues the run in output_dir, overwrite replaces it. "
         "Drop one of them")
    need(not c.new_global_batch or bool(c.resume_from), "checkpoint.new_global_batch", "only changes how a resumed "
         "run continues, and checkpoint.resume_from is not set: drop it, or name the checkpoint to resume")
    need(o.hub_strategy != "every_save" or not o.push_to_hub or bool(c.save_every_steps or c.save_every_epoch),
         "output.hub_strategy", "every_save pushes at each checkpoint, but no checkpoint is saved: set "
         "checkpoint.save_every_steps or checkpoint.save_every_epoch (or use hub_strategy: end)")
    need(c.save_every_steps is None or c.save_every_steps >= 1, "checkpoint.save_every_steps", "must be >= 1 when set")
    need(c.keep_last is None or c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (or null to keep all)")
    need(c.keep_best >= 0, "checkpoint.keep_best", f"must be >= 0, got {c.keep_best}")
    need(c.best_metric in metrics.ALL, "checkpoint.best_metric", f"must be one of {', '.join(metrics.ALL)}")
