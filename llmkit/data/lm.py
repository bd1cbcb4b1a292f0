"""Causal-LM data: packing plain text into fixed blocks, and chat / prompt-response rows with the loss on
response tokens only (prompt tokens get label -100)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from llmkit.config import DataConfig
from llmkit.data import formats, mixture, packing, sources
from llmkit.data.packing import IGNORE, PackStats, column
from llmkit.errors import LlmkitError

CLASS_KEY = "class_ids"  # label-word rows: each row's class, read by the class-weighted loss, never by the model


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # some versions return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def chat_example(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """Render `messages` with the tokenizer's chat template; only assistant turns carry labels."""
    if not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("the tokenizer has no chat template; use prompt/response columns, or set one")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise LlmkitError(f"message {i} must be a mapping with role system|user|assistant and content, got {m!r}")
    full = _chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # the tokens this assistant turn adds on top of the conversation before it (with the assistant header)
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else _chat_ids(tokenizer, messages[:i + 1])  # last turn: no re-render
        if full[:len(upto)] != upto or upto[:len(before)] != before:
            raise LlmkitError("the chat template does not render a conversation as a prefix of its continuation, "
                              "so response tokens cannot be located; use prompt/response columns instead")
        labels[len(before):len(upto)] = upto[len(before):]
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def prompt_response_example(tokenizer, prompt: str, response: str, max_length: int | None = None) -> dict:
    """A single-turn example: with a chat template, as user/assistant turns; without, prompt + response + EOS."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return chat_example(tokenizer, messages, max_length)
    if tokenizer.eos_token_id is None:
        raise LlmkitError("the tokenizer has neither a chat template nor an EOS token to end responses with")
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = p + r, [IGNORE] * len(p) + r
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def render_prompt(template: str, text: str, text_pair: str | None = None) -> str:
    """Put a row's text into the prompt template (plain replacement: other braces in the template stay as they are)."""
    out = template.replace("{text}", text)
    return out.replace("{text_pair}", text_pair) if text_pair is not None else out


def fit_prompt(tokenizer, template: str, text: str, response: str, max_length: int, text_pair: str | None = None):
    """prompt_response_example for `text` in `template`, with the text cut (never the response) to fit."""
    example = prompt_response_example(tokenizer, render_prompt(template, text, text_pair), response)
    over = len(example["input_ids"]) - max_length
    if over <= 0:
        return example
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while over > 0:
        keep = len(ids) - over - 1
        if keep <= 0:
            raise LlmkitError(f"data.max_length {max_length} leaves no room for the text: the prompt template and "
                              f"response '{response}' alone take {len(example['input_ids']) - len(ids)} tokens. "
                              "Raise data.max_length or shorten data.prompt_template.")
        ids = ids[:keep]
        example = prompt_response_example(tokenizer, render_prompt(template, tokenizer.decode(ids), text_pair),
                                          response)
        over = len(example["input_ids"]) - max_length
    return example


def label_candidates(tokenizer, cfg, words: list[str], text: str, text_pair: str | None = None) -> dict:
    """One rendered sequence per label word for the same prompt, and the response-token targets of each."""
    examples = [fit_prompt(tokenizer, cfg.prompt_template, text, w, cfg.max_length, text_pair) for w in words]
    return {"candidates": [e["input_ids"] for e in examples], "targets": [e["labels"] for e in examples]}


@dataclass
class LMData:
    train: Dataset  # input_ids, attention_mask, labels
    validation: Dataset  # the same for "packed" / "prompt_response" / "chat"; label candidates for "labels"
    mode: str  # "packed" | "prompt_response" | "chat" | "labels" (formats.MODE of the row format)
    packing: PackStats | None
    train_lengths: np.ndarray | None = None  # rows' token counts, from a column (None for packed blocks: all equal)
    test: Dataset | None = None  # "labels" only: candidates of the test split
    rows: dict[str, Dataset] | None = None  # "labels" only: validation / test rows (text + label ids)
    label_names: list[str] | None = None
    label_words: list[str] | None = None
    format: str = "labels"  # the row format (formats.choose), or "mixture"
    sources: list[dict] | None = None  # a mixture: per source, examples and tokens drawn (mixture.mix)


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
        return {**out, CLASS_KEY: row["labels"], "length": len(out["input_ids"])}  # class: for train.class_weights

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
            scored[role] = ds.sort("length").remove_columns("length")
    return LMData(train=train, validation=scored["validation"], mode="labels", packing=None,
                  train_lengths=column(train, "length"), test=scored.get("test"),
                  rows={role: rows[role] for role in scored}, label_names=names, label_words=words)


def _render(cfg: DataConfig, fmt: str, tokenizer, row: dict) -> dict:
    """One SFT row as token ids with response-only labels, plus its length and trained-token count (columns the
    loaders and the drop check read without a pass over the rows)."""
    if fmt == "messages":
        ex = chat_example(tokenizer, row[cfg.messages_column or "messages"], cfg.max_length)
    elif fmt == "sharegpt":
        ex = chat_example(tokenizer, formats.sharegpt_messages(row[cfg.messages_column or "conversations"]),
                          cfg.max_length)
    else:
        if fmt == "alpaca":
            prompt, response = formats.prompt_of(row)
        else:
            prompt, response = (row[c] for c in (cfg.prompt_column or "prompt", cfg.response_column or "response"))
            for name, value in (("prompt", prompt), ("response", response)):
                if not isinstance(value, str):
                    raise LlmkitError(f"the {name} must be a string, got {value!r}")
        ex = prompt_response_example(tokenizer, prompt, response, cfg.max_length)
    return {**ex, "length": len(ex["input_ids"]), "trained": sum(t != IGNORE for t in ex["labels"])}


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
        wanted = sources.wanted_splits(dataclasses.replace(cfg, eval_split=None, test_split=None), raw)
        wanted.update({"validation": cfg.eval_split} if cfg.eval_split in raw else {})
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
            def render(row, i, split=split, rows=rows):
                try:
                    return _render(cfg, choice.format, tokenizer, row)
                except LlmkitError as exc:
                    raise LlmkitError(f"split '{split}' row {rows[i]} ({choice.format}): {exc}") from None

            ds = ds.map(render, with_indices=True, remove_columns=choice.columns, desc=f"rendering {role}")
            out[role] = _drop_untrained(ds, role, cfg, rows, log)
    return _Source(out["train"], out.get("validation"), choice, stats)


def prepare(cfg: DataConfig, tokenizer, seed: int, log=print) -> LMData:
    """Load the splits and turn them into causal-LM examples: packed blocks, rows with response-only labels,
    generative-classification rows, or a mixture of sources. Everything stays in datasets' Arrow cache."""
    if cfg.prompt_template:
        return _prepare_labels(cfg, tokenizer, seed, log)
    if cfg.mixture:
        return _prepare_mixture(cfg, tokenizer, seed, log)
    one = _prepare_source(cfg, tokenizer, seed, log)
    lengths = None if one.choice.mode == "packed" else column(one.train, "length")
    return LMData(train=one.train, validation=one.validation, mode=one.choice.mode, packing=one.packing,
                  train_lengths=lengths, format=one.choice.format)


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
        raise LlmkitError(f"no source of data.mixture has a '{cfg.eval_split}' split to validate on: give one "
                          "source that split, or set data.mixture[i].eval_split to a split it has")
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
        if CLASS_KEY in rows[0]:
            batch[CLASS_KEY] = torch.tensor([r[CLASS_KEY] for r in rows], dtype=torch.long)
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
    raw = sources.load_raw(cfg)
    split = sources.wanted_splits(cfg, raw)["train"]
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
