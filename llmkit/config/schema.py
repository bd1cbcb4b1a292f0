"""Every config key in one place: its type (a Literal lists the allowed values), its default, its meaning and which
recipe reads it. `llmkit config` prints this, a starter YAML is written from it, the loader checks values against
it and the preflight refuses a key set for a recipe that would not read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit import metrics

RECIPES = ("classification", "causal_lm")
# who reads a key: the classification recipe, the causal-LM recipe, and the causal-LM recipe with label words
# (data.prompt_template: generative classification, which reads the classifier's data keys too)
READERS = ("classification", "causal_lm", "label_words")
CLASSIFIERS = ("classification", "label_words")  # a key only what classifies reads
CAUSAL = ("causal_lm", "label_words")  # a key only the causal-LM recipe reads

# keys renamed since an earlier llmkit: a config that still uses the old name is told the new one
RENAMED = {"eval_split": "validation_split"}  # the split's role is "validation" everywhere else

Precision = Literal["auto", "fp32", "bf16", "fp16"]
RowFormat = Literal["auto", "text", "prompt_response", "messages", "alpaca", "sharegpt"]  # llmkit.data.formats


def key(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, readers: tuple = READERS):
    """A config key: its default, its meaning, and who reads it (a key another recipe reads is refused there)."""
    meta = {"help": help, "readers": readers}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = key("asset:minilm", "Hub id, local dir, or asset:<name> (see `llmkit assets`)")
    tokenizer: str | None = key(None, "defaults to name_or_path")
    revision: str | None = key(None, "a Hub branch, tag or commit of the model")
    from_scratch: bool = key(False, "random init from the model's config instead of its weights")
    trust_remote_code: bool = key(False, "run the model repo's own Python code (only for repos you trust)")
    gradient_checkpointing: bool = key(False, "recompute activations in backward: less memory, ~30% slower")
    dtype: Literal["float32", "bfloat16", "float16"] | None = key(None, "the dtype weights load in (default: float32)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = key(
        None, "attention kernel; flash_attention_2 needs CUDA and flash-attn")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = key(False, "train peft LoRA adapters (and a classifier head in full) instead of every weight")
    r: int = key(16, "adapter rank")
    alpha: int = key(32, "adapter scale: updates are multiplied by alpha / r")
    dropout: float = key(0.05, "dropout on the adapter inputs")
    target_modules: list[str] | None = key(None, "default: chosen per architecture (see llmkit.model)")
    load_in_4bit: bool = key(False, "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes), the adapters on top")


@dataclass(frozen=True)
class MixtureSource:
    """One source of data.mixture: where its rows are and how to read them; unset keys come from data.*."""
    weight: float = key(help="the share of training examples drawn from this source (weights are normalised)")
    dataset: str | None = key(None, "as data.dataset, for this source")
    dataset_config: str | None = key(None, "as data.dataset_config")
    data_files: dict[str, str] | None = key(None, "as data.data_files")
    train_split: str | None = key(None, "as data.train_split")
    validation_split: str | None = key(None, "its validation rows join the run's validation split when it has this "
                                       "split")
    format: RowFormat | None = key(None, "as data.format")
    text_column: str | None = key(None, "as data.text_column")
    prompt_column: str | None = key(None, "as data.prompt_column")
    response_column: str | None = key(None, "as data.response_column")
    messages_column: str | None = key(None, "as data.messages_column")


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = key(None, "Hub id, local dir or file, or asset:<name>")
    dataset_config: str | None = key(None, 'Hub subset, e.g. "sst2" for "glue"')
    data_files: dict[str, str] | None = key(None, "split -> local csv/json/jsonl/parquet file")
    train_split: str = key("train", "the split trained on")
    validation_split: str = key("validation", "the split evaluated during training and for the best checkpoint")
    test_split: str | None = key("test", "evaluated once at the end; null for none")
    text_column: str = key("text", "the input text (classifiers, label words, plain-text causal LM rows)")
    text_pair_column: str | None = key(None, "a second text (pairs: NLI, paraphrase)", readers=CLASSIFIERS)
    label_column: str = key("label", "the label (names or ids)", readers=CLASSIFIERS)
    label_names: list[str] | None = key(None, "fixes the label order; default: from the data", readers=CLASSIFIERS)
    max_length: int = key(128, "tokens per row (longer rows are cut); causal-LM text: the block size")
    clean_text: bool = key(False, "unicode NFKC, strip HTML tags and URLs, squeeze whitespace", readers=CLASSIFIERS)
    drop_bad_rows: bool = key(True, "rows with empty/None text or no label: dropped with a count (false: an error)")
    group_by_length: bool = key(True, "batches of similar length: little padding")
    max_train_samples: int | None = key(None, "use only the first N training rows (after the shuffle)")
    max_eval_samples: int | None = key(None, "use only the first N rows of each evaluation split")
    exclude_rows: str | list[int] | None = key(None, "training rows left out, by row id (the row's place in the "
                                               "train split as read, from 0): a list, a .txt of ids, or the "
                                               "suspects.jsonl of `llmkit audit`", readers=CLASSIFIERS)
    format: RowFormat = key("auto", "causal LM rows (llmkit.data.formats): auto (from the columns) | text (packed "
                            "into blocks of max_length tokens) | prompt_response | messages | alpaca | sharegpt; "
                            "the last four train on the responses only", readers=("causal_lm",))
    prompt_column: str | None = key(None, "prompt_response rows: the prompt (default prompt); setting it under "
                                    "format auto picks that format", readers=("causal_lm",))
    response_column: str | None = key(None, "prompt_response rows: the response (default response)",
                                      readers=("causal_lm",))
    messages_column: str | None = key(None, "messages / sharegpt rows: the conversation (default messages / "
                                      "conversations)", readers=("causal_lm",))
    mixture: list[MixtureSource] | None = key(None, "several sources, interleaved by weight with train.seed "
                                              "(instead of data.dataset / data.data_files); each source is read "
                                              "like data.dataset with its own keys over these",
                                              readers=("causal_lm",))
    streaming: bool = key(False, "read the train split as a stream (Hub or local): each rank its own share, "
                          "tokenized and packed on the fly, in stream order (no shuffle), resumed at the exact row; "
                          "needs train.max_steps", readers=("causal_lm",))
    packing: bool = key(False, "prompt/response and chat rows packed padding-free: each batch's rows end to end, "
                        "position_ids restarting per row, no attention across rows (plain text is always packed, "
                        "into blocks; label words refuse it)", readers=CAUSAL)
    prompt_template: str | None = key(None, "generative classification: each row becomes this template (with "
                                      "{text}, and {text_pair} for pairs) and the response is its label word; "
                                      "evaluation scores every label word by log-likelihood", readers=CAUSAL)
    label_words: list[str] | None = key(None, "one per label, in label order; default: the label names",
                                        readers=CAUSAL)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = key(42, "data order, initialisation and dropout")
    epochs: float = key(1.0, "passes over the train split (fractions allowed)")
    max_steps: int | None = key(None, "optimizer steps; overrides epochs when set")
    per_device_batch_size: int = key(16, "rows per micro-batch on each rank")
    eval_batch_size: int = key(64, "rows per evaluation batch on each rank")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step on each rank")
    learning_rate: float = key(5e-5, "peak AdamW learning rate")
    weight_decay: float = key(0.01, "AdamW decoupled weight decay (not on biases and norms)")
    adam_beta1: float = key(0.9, "AdamW first-moment decay")
    adam_beta2: float = key(0.999, "AdamW second-moment decay")
    adam_epsilon: float = key(1e-8, "AdamW denominator epsilon")
    lr_scheduler: Literal["linear", "cosine", "constant"] = key("linear", "the learning-rate schedule after warm-up")
    warmup_ratio: float = key(0.06, "share of the steps with a linear warm-up")
    max_grad_norm: float = key(1.0, "0 turns clipping off")
    precision: Precision = key("auto", "auto: bf16 where the hardware runs it fast, else fp32")
    eval_every_steps: int | None = key(None, "also evaluate every N optimizer steps (always at epoch end)")
    logging_steps: int = key(10, "log the train scalars every N optimizer steps")
    num_threads: int | None = key(None, "torch CPU threads per rank; default: cores / local ranks")
    class_weights: list[float] | Literal["balanced"] | None = key(
        None, "null | balanced | [w0, w1, ...] in label order", readers=CLASSIFIERS)
    loss_scale_patience: int = key(50, "fp16: stop after this many steps with the loss scale at its minimum")
    collective_timeout_minutes: int = key(120, "how long a rank waits for the others in any collective (every "
                                          "process group): after training, rank 0 checks the export, merges LoRA "
                                          "and explains rows in fresh processes while the others wait (a 7B "
                                          "model: many minutes)")
    sample_prompts: list[str] | None = key(None, "greedy completions logged at every eval", readers=CAUSAL)
    sample_max_new_tokens: int = key(48, "tokens generated per sample prompt", readers=CAUSAL)
    # speed switches (bench/README.md has each one's measured effect)
    adamw_impl: Literal["fused", "foreach", "loop"] = key("fused", "fused: one kernel for all params (~6x faster "
                                                          "on CPU) | foreach | loop")
    dataloader_workers: int = key(0, "worker processes per rank for collation (0: in the training process)")
    pin_memory: bool | None = key(None, "page-locked host batches; default: on with a GPU")
    torch_compile: bool = key(False, "torch.compile each repeated block (inductor, dynamic shapes); slow first steps")
    loss_chunk: int = key(256, "a causal LM's loss and evaluation project only the scored positions onto the "
                          "vocabulary, this many at a time, each chunk's gradient made while its logits are alive "
                          "(no tokens x vocab logits, the same loss; smaller: less memory, more time in the head); "
                          "0: the model's full logits, as also where a model changes its logits after the head "
                          "(soft-capping, scaling) or its head has LoRA", readers=CAUSAL)
    profile_steps: int = key(0, "> 0: torch.profiler trace of this many steps (after 3 warm-up) to <run dir>/profile")
    report_to: list[str] | str = key(help="experiment trackers (Accelerate's): tensorboard | wandb | mlflow | "
                                     "trackio | comet_ml | aim | clearml | dvclive | swanlab, or none; the resolved "
                                     "config goes to each as hyperparameters", factory=lambda: ["tensorboard"])
    run_name: str | None = key(None, "the trackers' run name; default: output_dir's folder name")
    tracker_tags: list[str] | None = key(None, "tags on the run (W&B, MLflow, Comet, SwanLab)")
    tracker_project: str = key("llmkit", "W&B project, MLflow experiment, Trackio / Comet / SwanLab project")


@dataclass(frozen=True)
class DeepSpeedConfig:
    config_file: str | None = key(None, "DeepSpeed JSON; default: the one the Accelerate config names")
    zero_stage: Literal[0, 1, 2, 3] | None = key(None, "when set, must agree with the JSON")


@dataclass(frozen=True)
class CheckpointConfig:
    save_every_steps: int | None = key(None, "write checkpoints/step-<n> every N optimizer steps")
    save_every_epoch: bool = key(False, "also write a checkpoint at each epoch end")
    keep_last: int | None = key(2, "newest checkpoints kept (None keeps all)")
    keep_best: int = key(0, "also keep this many best ones by best_metric (from the evals at checkpoint steps)")
    best_metric: Literal[metrics.ALL] = key("f1_macro", "an eval metric: f1_macro, the mean of every label's F1; "
                                            "f1, precision, recall: of the second label (id 1) with two labels, the "
                                            "macro average with more; accuracy; loss and perplexity (lower is better)")
    resume_from: str | None = key(None, '"latest" (in output_dir) or a checkpoint folder')
    new_global_batch: bool = key(False, "a resume takes this launch's ranks x accumulation, not the checkpoint's")


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str = key("outputs/run", "the run's folder: export, reports, checkpoints, logs")
    overwrite_output_dir: bool = key(False, "replace an earlier llmkit run (kept until the new export is in place)")
    push_to_hub: bool = key(False, "push final/ + report + model card at the end; token: HF_TOKEN or `hf auth login`")
    hub_model_id: str | None = key(None, "<user or org>/<name>")
    hub_private: bool = key(True, "create the Hub repo private")
    hub_revision: str | None = key(None, "a branch; default main")
    hub_strategy: Literal["end", "every_save"] = key("end", "end | every_save (each checkpoint too, uploaded in the "
                                                     "background)")
    hub_push_merged: bool = key(False, "LoRA runs: also push the merged model (under merged/)")
    verify_export: bool = key(True, "reload final/ in a fresh CPU process and require the run's logits (LoRA runs "
                              "always do: the merge runs there); false: only the whole-file and no-empty-tensor "
                              "checks, for a model too big to load a second time in host memory")
    explain_rows: int = key(8, "report rows explained word by word (mistakes first); 0: none", readers=CLASSIFIERS)
    explain_max_steps: int = key(256, "integrated gradients start at 16 steps; a row whose delta is over 5% of what "
                                 "it explains is redone with twice as many, up to this (a row still over is "
                                 "flagged with its steps); 16: never raised", readers=CLASSIFIERS)
    hub_license: str | None = key(None, 'model card license; default: the base model\'s when known, else "other"')
    quantize: list[str] = key(help="quantized copies written beside final/ after the verified export "
                              "(final-<format>/), each scored against the full model (onnx-int8 in onnxruntime, GGUF "
                              "by transformers' GGUF reader, not llama.cpp, torchao-int8 in PyTorch with torchao): "
                              "onnx-int8 (sequence classifiers), gguf-f16, gguf-q8_0 (Llama-family causal LMs), "
                              "torchao-int8 (causal LMs); "
                              "`llmkit quantize` makes them for any export",
                              factory=list)


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


def sections() -> list[tuple[str, type]]:
    """(section name, its dataclass), in order."""
    return [(f.name, type(getattr(Config(), f.name))) for f in dataclasses.fields(Config)]


def reader_of(recipe: str, cfg: Config) -> str:
    """Which reader (READERS) a run of `recipe` with this config is: label words read the classifier's keys."""
    return "label_words" if recipe == "causal_lm" and cfg.data.prompt_template is not None else recipe


READER_NAMES = {"classification": "recipes/classification.py", "causal_lm": "recipes/causal_lm.py",
                "label_words": "recipes/causal_lm.py with data.prompt_template"}


def who_reads(readers: tuple[str, ...]) -> str:
    if set(CAUSAL) <= set(readers):  # both causal-LM readers: the recipe, whatever its data
        readers = tuple(r for r in readers if r != "label_words")
    return " or ".join(READER_NAMES[r] for r in readers)
