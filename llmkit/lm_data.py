"""Causal-LM data: packing plain text into fixed blocks, and chat / prompt-response rows with the loss on
response tokens only (prompt tokens get label -100)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

IGNORE = -100  # label of a token that does not count in the loss


@dataclass
class PackStats:
    documents: int
    tokens: int  # real tokens placed, EOS separators included
    blocks: int
    block_size: int

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots: 1.0 means no padding at all."""
        return self.tokens / max(1, self.blocks * self.block_size)


def pack(documents: list[list[int]], block_size: int, eos_id: int, pad_id: int) -> tuple[dict, PackStats]:
    """Concatenate documents, each followed by EOS, and cut the stream into blocks of `block_size` tokens.

    Every token lands in exactly one block, in order. Only the last block can be short: it is padded with
    `pad_id`, its padding masked out of attention and loss.
    """
    if block_size < 2:
        raise LlmkitError(f"the packing block size must be >= 2, got {block_size}")
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(eos_id)
    input_ids, attention, labels = [], [], []
    for start in range(0, len(stream), block_size):
        block = stream[start:start + block_size]
        pad = block_size - len(block)
        input_ids.append(block + [pad_id] * pad)
        attention.append([1] * len(block) + [0] * pad)
        labels.append(block + [IGNORE] * pad)
    stats = PackStats(documents=len(documents), tokens=len(stream), blocks=len(input_ids), block_size=block_size)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, stats


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
        upto = _chat_ids(tokenizer, messages[:i + 1])
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


@dataclass
class LMData:
    train: object  # datasets.Dataset with input_ids, attention_mask, labels
    eval: object
    mode: str  # "packed" | "prompt_response" | "chat"
    packing: PackStats | None


def _mode(cfg) -> str:
    if cfg.messages_column:
        return "chat"
    if cfg.prompt_column or cfg.response_column:
        if not (cfg.prompt_column and cfg.response_column):
            raise LlmkitError("data.prompt_column and data.response_column must be set together")
        return "prompt_response"
    return "packed"


def prepare(cfg, tokenizer, seed: int, log=print) -> LMData:
    """Load the splits and turn them into causal-LM examples: packed blocks, or rows with response-only labels."""
    from llmkit import data

    raw = data.load_raw(cfg)
    wanted = data.wanted_splits(cfg, raw)
    mode = _mode(cfg)
    columns = {"chat": [cfg.messages_column], "prompt_response": [cfg.prompt_column, cfg.response_column],
               "packed": [cfg.text_column]}[mode]
    out, stats = {}, None
    for role in ("train", "eval"):
        split = wanted[role]
        ds = raw[split]
        data.require_columns(ds, split, columns)
        ds = ds.select_columns(columns)
        if role == "train":
            ds = ds.shuffle(seed=seed)
        limit = cfg.max_train_samples if role == "train" else cfg.max_eval_samples
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        if mode == "packed":
            if tokenizer.eos_token_id is None:
                raise LlmkitError("packing separates documents with EOS, but the tokenizer has no eos token")
            docs = [tokenizer(t)["input_ids"] for t in ds[cfg.text_column] if isinstance(t, str) and t.strip()]
            blocks, pack_stats = pack(docs, cfg.max_length, tokenizer.eos_token_id, tokenizer.pad_token_id)
            from datasets import Dataset

            out[role] = Dataset.from_dict(blocks)
            if role == "train":
                stats = pack_stats
                log(f"data: packed {pack_stats.documents} documents ({pack_stats.tokens} tokens) into "
                    f"{pack_stats.blocks} blocks of {pack_stats.block_size}: efficiency {pack_stats.efficiency:.4f}")
        else:
            def render(row):
                if mode == "chat":
                    return chat_example(tokenizer, row[cfg.messages_column], cfg.max_length)
                return prompt_response_example(tokenizer, row[cfg.prompt_column], row[cfg.response_column],
                                               cfg.max_length)

            out[role] = ds.map(render, remove_columns=columns, desc=f"rendering {role}")
    return LMData(train=out["train"], eval=out["eval"], mode=mode, packing=stats)


class LMCollator:
    """Pads input_ids with the pad token, attention with 0 and labels with -100 (right padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, fill: int):
            return torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)

        return {"input_ids": padded("input_ids", self.pad_id), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", IGNORE)}
