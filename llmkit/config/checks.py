"""The config's value rules, section by section: `check_values` runs on every loaded config and each message names
the key and what it accepts. Types and allowed values (the schema's Literals) are checked before, by the build."""

from __future__ import annotations

import re
from pathlib import Path

from llmkit.compression import FORMATS
from llmkit.errors import LlmkitError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo_id: str | None, key: str = "output.hub_model_id") -> str:
    """A Hub repo id of the form <user or org>/<name>; a clear error otherwise."""
    if not repo_id or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise LlmkitError(f"{key} must look like <user or org>/<name> (letters, digits, . _ -), got {repo_id!r}")
    return repo_id


BRANCH = re.compile(r"^(?![-/.])[A-Za-z0-9._/-]+(?<![/.])$")  # a subset of git's ref rules, enough for the Hub


def check_hub_token() -> str:
    """The Hub token from HF_TOKEN or the `hf auth login` store; a clear error when there is none. With the repo id
    and revision checks: what a push needs, checked by the preflight before training and by ship.hub before work."""
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise LlmkitError("pushing to the Hub needs a token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    return found


def check_revision(revision: str | None, key: str = "output.hub_revision") -> str | None:
    """A branch name git and the Hub accept (letters, digits, . _ - /; no '..', no leading or trailing . or /)."""
    if revision is not None and (not BRANCH.match(revision) or ".." in revision or revision.endswith(".lock")):
        raise LlmkitError(f"{key} must be a branch name (letters, digits, . _ - /, no spaces or '..'), got "
                          f"{revision!r}")
    return revision


def _need(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise LlmkitError(f"config key '{key}' {why}")


def check_values(cfg) -> None:
    """Reject impossible values of a llmkit.config.Config; every message names the key."""
    for check in (_train, _model, _data, _lora, _deepspeed, _output_and_checkpoint):
        check(cfg)


def _train(cfg) -> None:
    t, need = cfg.train, _need
    need(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    need(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be > 0 when set, got {t.max_steps}")
    need(t.per_device_batch_size >= 1, "train.per_device_batch_size", f"must be >= 1, got {t.per_device_batch_size}")
    need(t.loss_chunk >= 0, "train.loss_chunk", f"must be >= 0 (0: the full logits), got {t.loss_chunk}")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    need(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
         f"must be >= 1, got {t.gradient_accumulation_steps}")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    need(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2", "must be in [0, 1)")
    need(t.adam_epsilon > 0, "train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    need(t.eval_every_steps is None or t.eval_every_steps > 0, "train.eval_every_steps", "must be > 0 when set")
    need(t.logging_steps >= 1, "train.logging_steps", f"must be >= 1, got {t.logging_steps}")
    need(t.num_threads is None or 1 <= t.num_threads <= 4096, "train.num_threads",
         f"must be in [1, 4096] when set (threads per rank), got {t.num_threads}")
    need(t.sample_max_new_tokens >= 1, "train.sample_max_new_tokens", f"must be >= 1, got {t.sample_max_new_tokens}")
    need(t.dataloader_workers >= 0, "train.dataloader_workers", f"must be >= 0, got {t.dataloader_workers}")
    need(t.profile_steps >= 0, "train.profile_steps", f"must be >= 0, got {t.profile_steps}")
    w = t.class_weights
    need(not isinstance(w, list) or (len(w) >= 2 and all(x > 0 for x in w)), "train.class_weights",
         f"must be null, balanced, or a list of positive weights (one per label), got {w!r}")
    need(t.loss_scale_patience >= 1, "train.loss_scale_patience", f"must be >= 1, got {t.loss_scale_patience}")
    need(t.collective_timeout_minutes >= 1, "train.collective_timeout_minutes",
         f"must be >= 1, got {t.collective_timeout_minutes}")


def _model(cfg) -> None:
    _need(bool(cfg.model.name_or_path), "model.name_or_path", "must name a Hub id, a local dir or asset:<name>")


def _data(cfg) -> None:
    d, need = cfg.data, _need
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
    else:
        need(d.dataset is not None or d.data_files is not None, "data.dataset",
             "is missing: set data.dataset (Hub id, local path or asset:<name>) or data.data_files")
    need(d.dataset is None or d.data_files is None, "data.data_files",
         "cannot be used together with data.dataset: pick one")
    need(bool(d.train_split), "data.train_split", "must name the training split")
    need(bool(d.validation_split), "data.validation_split", "must name the evaluation split (e.g. validation)")
    if d.data_files is not None:
        for key, split in (("data.train_split", d.train_split), ("data.validation_split", d.validation_split),
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
    if d.label_words is not None:
        need(d.prompt_template is not None, "data.label_words", "needs data.prompt_template (generative labels)")
        need(len(set(d.label_words)) == len(d.label_words) >= 2 and all(w.strip() for w in d.label_words),
             "data.label_words", "must list at least 2 distinct, non-empty words")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}", f"must be >= 1 when set, got {value}")


def _lora(cfg) -> None:
    lo, need = cfg.lora, _need
    need(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
    need(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(not lo.load_in_4bit or lo.enabled, "lora.load_in_4bit",
         "needs lora.enabled: true (QLoRA trains LoRA adapters on the 4-bit base)")
    need(not (lo.load_in_4bit and cfg.model.from_scratch), "lora.load_in_4bit",
         "quantizes pretrained weights; a from-scratch model has none to quantize")
    need(lo.target_modules is None or len(lo.target_modules) > 0, "lora.target_modules",
         "must list module names (or be null for the per-architecture default)")


def _deepspeed(cfg) -> None:
    if cfg.deepspeed.config_file is not None:
        _need(Path(cfg.deepspeed.config_file).is_file(), "deepspeed.config_file",
              f"points to '{cfg.deepspeed.config_file}', which does not exist")


def _output_and_checkpoint(cfg) -> None:
    o, c, need = cfg.output, cfg.checkpoint, _need
    need(bool(o.output_dir), "output.output_dir", "must name a directory")
    need(0 <= o.explain_rows <= 200, "output.explain_rows", f"must be in [0, 200] (each row costs an integrated-"
         f"gradients pass per label), got {o.explain_rows}")
    need(1 <= o.explain_max_steps <= 4096, "output.explain_max_steps", f"must be in [1, 4096] (each step is a "
         f"forward and backward pass per label of a raised row), got {o.explain_max_steps}")
    for name in o.quantize:
        need(name in FORMATS, "output.quantize", f"lists {name!r}; llmkit writes {', '.join(FORMATS)}")
    need(len(set(o.quantize)) == len(o.quantize), "output.quantize", f"names a format twice: {o.quantize}")
    if o.push_to_hub:
        check_repo_id(o.hub_model_id)
    check_revision(o.hub_revision)
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
