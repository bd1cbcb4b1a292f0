"""Causal-LM data, split by split: one dataset (its row format from llmkit.data.formats, packed text through
llmkit.data.packing), a stream (llmkit.data.streaming), a mixture of sources (llmkit.data.mixture), or
label-word rows for generative classification (their prompts: llmkit.data.label_prompts); and the collators of
those examples."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformers import DataCollatorWithFlattening

from llmkit.config import DataConfig
from llmkit.data import formats, mixture, packing, sources, streaming
from llmkit.data.label_prompts import fit_prompt, label_candidates
from llmkit.data.packing import IGNORE, PackStats, by_length, column
from llmkit.errors import LlmkitError

CLASS_KEY = "class_ids"  # label-word rows: each row's class, read by the class-weighted loss, never by the model
ROWS_KEY = "rows"  # a flattened batch's row count, for the meter, never for the model
NOT_MODEL_INPUTS = (CLASS_KEY, ROWS_KEY, sources.ROW_ID_KEY)


@dataclass
class LMData:
    train: Dataset | streaming.Stream  # input_ids, attention_mask, labels (a Stream: data.streaming)
    validation: Dataset  # the same for "packed" / "prompt_response" / "chat"; label candidates for "labels"
    # two things, two names: `format` is how the rows are written (text, alpaca, sharegpt...), `mode` the kind of
    # training example they become (formats.MODE: several formats make one mode)
    mode: str  # "packed" | "prompt_response" | "chat" | "labels" | "mixed" (a mixture of modes)
    packing: PackStats | None
    train_lengths: np.ndarray | None = None  # rows' token counts, from a column (None for packed blocks: all equal)
    test: Dataset | None = None  # "labels" only: candidates of the test split
    rows: dict[str, Dataset] | None = None  # "labels" only: train / validation / test rows (text + label ids)
    label_names: list[str] | None = None
    label_words: list[str] | None = None
    format: str = "labels"  # the rows' format (formats.choose), "labels" for label words, or "mixture"
    sources: list[dict] | None = None  # a mixture: per source, examples and tokens drawn (mixture.mix)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, streaming.Stream)

    @property
    def facts(self) -> dict:
        """What metrics.json keeps of the data: how full the packed blocks are, what each mixed source gave."""
        return {**({"packing_efficiency": self.packing.efficiency} if self.packing is not None else {}),
                **({"data_mixture": self.sources} if self.sources else {})}

    @property
    def probe(self) -> Dataset:
        """Rows the export check runs the model on: the train split's first, or validation's for a stream."""
        return self.validation if self.streamed else self.train


def _prepare_labels(cfg, tokenizer, seed: int, log) -> LMData:
    """Generative classification rows: train on prompt -> label word; score every label word at eval."""
    labeled = sources.load_labeled(cfg, seed, log)
    names = labeled.label_names
    words = list(cfg.label_words or names)
    if len(words) != len(names):
        raise LlmkitError(f"data.label_words has {len(words)} words but the data has {len(names)} labels {names}")
    pair = cfg.text_pair_column
    first = label_candidates(tokenizer, cfg, words, "example")["candidates"]
    if len({tuple(c) for c in first}) != len(words):
        raise LlmkitError(f"the label words {words} tokenize to identical sequences; pick distinguishable words")

    def train_row(row):
        out = fit_prompt(tokenizer, cfg.prompt_template, row[cfg.text_column], words[row["labels"]], cfg.max_length,
                         row[pair] if pair else None)
        # class: for train.class_weights; the row's id: for the training dynamics
        return {**out, CLASS_KEY: row["labels"], sources.ROW_ID_KEY: row[sources.ROW_ID_KEY],
                "length": len(out["input_ids"])}

    def eval_row(row, index):
        out = label_candidates(tokenizer, cfg, words, row[cfg.text_column], row[pair] if pair else None)
        return {**out, "row": index, "length": max(map(len, out["candidates"]))}

    rows = labeled.rows
    # the token labels replace the label ids (columns are removed after the function has read them)
    train = rows["train"].map(train_row, remove_columns=rows["train"].column_names, desc="rendering train")
    scored = {}
    for role in ("validation", "test"):
        if role in rows:
            ds = rows[role]
            ds = ds.map(eval_row, with_indices=True, desc=f"rendering {role}",
                        remove_columns=[c for c in ds.column_names if c != "labels"])
            # scored in length order, batches carry little padding (~0.99 instead of ~0.79 of real tokens);
            # "row" maps the scores back to the texts
            scored[role] = by_length(ds).remove_columns("length")
    return LMData(train=train, validation=scored["validation"], mode="labels", packing=None,
                  train_lengths=column(train, "length"), test=scored.get("test"),
                  rows={role: rows[role] for role in ("train", *scored)}, label_names=names, label_words=words)


@dataclass
class _Source:
    train: Dataset
    validation: Dataset | None
    choice: formats.Choice
    packing: PackStats | None


def _prepare_source(cfg: DataConfig, tokenizer, seed: int, log, need_validation: bool = True) -> _Source:
    """One dataset's train and validation splits as causal-LM examples in datasets' Arrow cache."""
    raw = sources.load_raw(cfg)
    if need_validation:
        wanted = sources.wanted_splits(dataclasses.replace(cfg, test_split=None), raw)
    else:  # a mixture source: its validation split when it has one
        wanted = sources.wanted_splits(dataclasses.replace(cfg, validation_split=None, test_split=None), raw)
        wanted.update({"validation": cfg.validation_split} if cfg.validation_split in raw else {})
    first = raw[wanted["train"]]
    choice = formats.choose(cfg, set(first.column_names), first[0] if len(first) else None)
    log(f"data: format {choice.format} ({choice.why})" + (f" for {cfg.dataset or 'data_files'}" if
                                                        not need_validation else ""))
    out, stats, text = {}, None, cfg.text_column
    for role, split in wanted.items():
        ds = raw[split]
        sources.require_columns(ds, split, choice.columns)
        ds = ds.select_columns(choice.columns)
        # the file row of each example, for messages; the shuffle is datasets' own (one numpy permutation)
        rows = np.random.default_rng(seed).permutation(len(ds)) if role == "train" else np.arange(len(ds))
        limit = cfg.max_train_samples if role == "train" else cfg.max_eval_samples
        rows = rows[:limit] if limit is not None else rows
        if role == "train" or len(rows) < len(ds):
            ds = ds.select(rows)
        if choice.mode == "packed":
            if tokenizer.eos_token_id is None:
                raise LlmkitError("packing separates documents with EOS, but the tokenizer has no eos token")
            ds = ds.filter(lambda b: [isinstance(t, str) and bool(t.strip()) for t in b[text]], batched=True,
                           desc=f"non-empty {role}")
            docs = packing.tokenize(ds, tokenizer, text, desc=f"tokenizing {role}")
            out[role], pack_stats = packing.pack_dataset(docs, cfg.max_length, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id, desc=f"packing {role}")
            if role == "train":
                stats = pack_stats
                log(f"data: packed {pack_stats.documents} documents ({pack_stats.tokens} tokens) into "
                    f"{pack_stats.blocks} blocks of {pack_stats.block_size}: efficiency {pack_stats.efficiency:.4f}")
        else:
            def render(batch, idx, split=split, rows=rows):
                try:
                    return formats.render_rows(cfg, choice.format, tokenizer, batch)
                except formats.RowError as exc:
                    raise LlmkitError(f"split '{split}' row {rows[idx[exc.index]]} ({choice.format}): {exc}") from None

            ds = ds.map(render, batched=True, with_indices=True, remove_columns=choice.columns,
                        desc=f"rendering {role}")
            out[role] = _drop_untrained(ds, role, cfg, rows, log)
    return _Source(out["train"], out.get("validation"), choice, stats)


def prepare(cfg: DataConfig, tokenizer, seed: int, log=print) -> LMData:
    """Load the splits and turn them into causal-LM examples: packed blocks, rows with response-only labels,
    generative-classification rows, or a mixture of sources. Everything stays in datasets' Arrow cache."""
    if cfg.prompt_template:
        return _prepare_labels(cfg, tokenizer, seed, log)
    if cfg.mixture:
        return _prepare_mixture(cfg, tokenizer, seed, log)
    if cfg.streaming:
        return _prepare_stream(cfg, tokenizer, log)
    one = _prepare_source(cfg, tokenizer, seed, log)
    lengths = None if one.choice.mode == "packed" else column(one.train, "length")
    return LMData(train=one.train, validation=one.validation, mode=one.choice.mode, packing=one.packing,
                  train_lengths=lengths, format=one.choice.format)


def _prepare_stream(cfg: DataConfig, tokenizer, log) -> LMData:
    """The train split as a lazy stream of examples (split by rank in the loader); validation read in full."""
    raw = sources.load_raw(cfg, streaming=True)
    wanted = sources.wanted_splits(dataclasses.replace(cfg, test_split=None), raw)
    first = next(iter(raw[wanted["train"]]), None)
    if first is None:
        raise LlmkitError(f"the streamed train split '{wanted['train']}' holds no rows")
    choice = formats.choose(cfg, set(first), first)
    missing = [c for c in choice.columns if c not in first]
    if missing:
        raise LlmkitError(f"split '{wanted['train']}' has no column {missing[0]!r} (columns: {sorted(first)}); set "
                          "the data.*_column keys to the right names")
    log(f"data: format {choice.format} ({choice.why}), streamed: rows in stream order, each rank its share "
        "(no length grouping, no shuffle)")
    if choice.mode == "packed" and tokenizer.eos_token_id is None:
        raise LlmkitError("packing separates documents with EOS, but the tokenizer has no eos token")

    def examples(ds: IterableDataset, split: str) -> IterableDataset:
        if choice.mode == "packed":
            return streaming.pack_stream(ds, tokenizer, cfg.text_column, cfg.max_length)

        def render(batch):
            try:
                return formats.render_rows(cfg, choice.format, tokenizer, batch)
            except formats.RowError as exc:
                row = {k: v[exc.index] for k, v in batch.items()}
                raise LlmkitError(f"a row of the streamed split '{split}' ({choice.format}): {exc}; the row: "
                                  f"{str(row)[:120]}") from None

        return ds.map(render, batched=True, batch_size=streaming.DOCS_PER_MAP, remove_columns=choice.columns
                      ).filter(lambda r: r["trained"] > 0)

    out = {}
    for role, split in wanted.items():
        ds = raw[split].select_columns(choice.columns)
        if role == "validation":  # scored in full at every eval: read once into memory
            ds = examples(ds, split)
            out[role] = Dataset.from_list(list(ds.take(cfg.max_eval_samples) if cfg.max_eval_samples else ds))
        else:  # each rank's share is cut out before it is tokenized (streaming.Stream)
            out[role] = streaming.Stream(ds, lambda share, split=split: examples(share, split))
    return LMData(train=out["train"], validation=out["validation"], mode=choice.mode, packing=None,
                  train_lengths=None, format=choice.format)


def _prepare_mixture(cfg: DataConfig, tokenizer, seed: int, log) -> LMData:
    """Each source prepared on its own (cached apart), then interleaved by weight; validation: the sources' own."""
    parts = []
    for i, src in enumerate(cfg.mixture):
        try:
            parts.append(_prepare_source(mixture.source_config(cfg, src), tokenizer, seed, log, need_validation=False))
        except LlmkitError as exc:
            raise LlmkitError(f"data.mixture[{i}] ({mixture.name_of(src)}): {exc}") from None
    trains = [mixture.as_rows(p.train, i, cfg.max_length) for i, p in enumerate(parts)]
    train, counts = mixture.mix(cfg.mixture, trains, seed)
    val = mixture.validation([mixture.as_rows(p.validation, i, cfg.max_length) if p.validation is not None
                              else None for i, p in enumerate(parts)])
    if val is None:
        raise LlmkitError(f"no source of data.mixture has a '{cfg.validation_split}' split to validate on: give one "
                          "source that split, or set data.mixture[i].validation_split to a split it has")
    for c in counts:
        log(f"data: mixture source {c['source']}: weight {c['weight']:g} ({c['weight_share']:.1%}), drew "
            f"{c['examples']} of {c['available']} examples ({c['drawn_share']:.1%}), {c['tokens']} tokens")
    modes = {p.choice.mode for p in parts}
    return LMData(train=train, validation=val, mode=modes.pop() if len(modes) == 1 else "mixed", packing=None,
                  train_lengths=column(train, "length"), format="mixture", sources=counts)


def _drop_untrained(ds, role: str, cfg: DataConfig, rows, log):
    """Rows whose prompt fills data.max_length keep no response token: nothing to learn, and a batch of only such
    rows has a 0/0 loss (NaN). Dropped with a count (an error with data.drop_bad_rows false, or when all are)."""
    empty = np.flatnonzero(column(ds, "trained") == 0)
    if not len(empty):
        return ds
    if len(empty) == len(ds):
        raise LlmkitError(f"no row of the {role} split keeps a response token within data.max_length "
                          f"{cfg.max_length}: the prompts fill it. Raise data.max_length or shorten the prompts.")
    if not cfg.drop_bad_rows:
        raise LlmkitError(f"{role} row {rows[empty[0]]}: its prompt fills data.max_length {cfg.max_length}, so none of "
                          "its response is trained on. Raise data.max_length, shorten the row, or set "
                          "data.drop_bad_rows: true to drop such rows with a count.")
    log(f"data: dropped {len(empty)} rows of the {role} split whose prompt fills data.max_length "
        f"{cfg.max_length} (no response token left)")
    keep = np.ones(len(ds), dtype=bool)
    keep[empty] = False
    return ds.select(np.flatnonzero(keep))


class FlatCollator:
    """data.packing for prompt/response and chat rows: the batch's rows end to end as one sequence, no padding,
    position_ids restarting at each row and its first label ignored (transformers' DataCollatorWithFlattening).
    With no attention mask, transformers builds a mask that keeps each row to itself from the position_ids
    (sdpa, eager); flash attention gets the sequence boundaries (varlen). `ROWS_KEY` carries the row count."""

    def __init__(self, flash: bool):
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE,
                                                  return_flash_attn_kwargs=flash)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        # no KV cache: transformers reads packed rows from the position_ids only when there is none
        return {**batch, "use_cache": False, ROWS_KEY: len(rows)}


class LMCollator:
    """Pads input_ids with the pad token, attention with 0 and labels with -100 (right padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, fill: int):
            return torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)

        batch = {"input_ids": padded("input_ids", self.pad_id), "attention_mask": padded("attention_mask", 0),
                 "labels": padded("labels", IGNORE)}
        for key in (CLASS_KEY, sources.ROW_ID_KEY):  # label-word rows: their class and identity
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


class CandidateCollator:
    """Flattens label candidates: B rows x K words -> B*K padded sequences, plus each row's gold label and index."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        seqs = [list(c) for r in rows for c in r["candidates"]]
        targets = [list(t) for r in rows for t in r["targets"]]
        width = max(len(x) for x in seqs)
        return {
            "input_ids": torch.tensor([x + [self.pad_id] * (width - len(x)) for x in seqs], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], dtype=torch.long),
            "targets": torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets], dtype=torch.long),
            "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            "row": torch.tensor([r["row"] for r in rows], dtype=torch.long),
        }


def training_texts(cfg: DataConfig):
    """Every text of the train split the model will see (plain text, prompts and responses, or chat turns)."""
    if cfg.mixture:
        for src in cfg.mixture:
            yield from training_texts(mixture.source_config(cfg, src))
        return
    raw = sources.load_raw(cfg)
    split = sources.wanted_splits(dataclasses.replace(cfg, validation_split=None, test_split=None), raw)["train"]
    ds = raw[split]
    choice = formats.choose(cfg, set(ds.column_names), ds[0] if len(ds) else None)
    sources.require_columns(ds, split, choice.columns)
    for row in ds.select_columns(choice.columns):
        for value in row.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):  # chat messages or ShareGPT turns
                yield from (m.get("content", m.get("value", "")) for m in value if isinstance(m, dict))
    if choice.mode == "labels":
        yield from (cfg.prompt_template, *(cfg.label_words or []))
