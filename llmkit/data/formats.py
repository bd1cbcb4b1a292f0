"""Row formats of causal-LM data (data.format): plain text, prompt/response, chat messages, alpaca and ShareGPT.
`choose` picks the format from the config or, with `auto`, from the train split's columns; `render` turns one
row into token ids with labels on the responses only (alpaca and ShareGPT rows through the chat path). A row
that does not fit its format is an error naming the row.

Training shape of each: text -> packed blocks (llmkit.data.packing); prompt_response, alpaca -> one prompt and
one response; messages, sharegpt -> a conversation with the loss on the assistant turns."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.config import DataConfig
from llmkit.data.packing import IGNORE, ids_of
from llmkit.errors import LlmkitError

MODE = {"text": "packed", "prompt_response": "prompt_response", "alpaca": "prompt_response", "messages": "chat",
        "sharegpt": "chat", "labels": "labels"}
ALPACA = ("instruction", "input", "output")  # input is optional
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Choice:
    format: str  # one of config.schema.RowFormat but auto, or "labels" (generative classification)
    columns: list[str]  # the columns its rows are read from
    why: str  # for the log

    @property
    def mode(self) -> str:
        return MODE[self.format]


def _columns(cfg: DataConfig, fmt: str, present: set[str] | None) -> list[str]:
    if fmt == "text":
        return [cfg.text_column]
    if fmt == "prompt_response":
        return [cfg.prompt_column or "prompt", cfg.response_column or "response"]
    if fmt == "messages":
        return [cfg.messages_column or "messages"]
    if fmt == "sharegpt":
        return [cfg.messages_column or "conversations"]
    if fmt == "alpaca":
        return [c for c in ALPACA if present is None or c in present or c != "input"]
    return [cfg.text_column]  # labels


def _looks_like_sharegpt(first_row: dict | None, column: str) -> bool:
    turns = (first_row or {}).get(column)
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def choose(cfg: DataConfig, present: set[str] | None = None, first_row: dict | None = None) -> Choice:
    """The format of the train split: data.format when set, the column keys the config names, else detected from
    the columns `present` (None: decide from the config alone, as far as it can)."""
    if cfg.prompt_template:
        return Choice("labels", [cfg.text_column], "data.prompt_template is set: label words")
    fmt = cfg.format
    if fmt != "auto":
        if (cfg.prompt_column or cfg.response_column) and fmt != "prompt_response":
            raise LlmkitError(f"data.format is {fmt} but data.prompt_column / data.response_column are set; "
                              "remove them, or set data.format: prompt_response")
        if cfg.messages_column and fmt not in ("messages", "sharegpt"):
            raise LlmkitError(f"data.format is {fmt} but data.messages_column is set; remove it, or set "
                              "data.format: messages (or sharegpt)")
        return Choice(fmt, _columns(cfg, fmt, present), f"data.format {fmt}")
    if cfg.prompt_column or cfg.response_column:
        if not (cfg.prompt_column and cfg.response_column):
            raise LlmkitError("data.prompt_column and data.response_column must be set together")
        return Choice("prompt_response", _columns(cfg, "prompt_response", present),
                      "data.prompt_column and data.response_column are set")
    if cfg.messages_column:
        fmt = "sharegpt" if _looks_like_sharegpt(first_row, cfg.messages_column) else "messages"
        return Choice(fmt, _columns(cfg, fmt, present), f"data.messages_column is set ({fmt} turns)")
    if present is None:
        return Choice("text", [cfg.text_column], "no format keys set (the columns decide at load time)")
    # detected from the columns, most specific first
    for fmt, needs in (("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
                       ("prompt_response", {"prompt", "response"}), ("text", {cfg.text_column})):
        if needs <= present:
            if fmt == "text" and "messages" in present:
                break
            return Choice(fmt, _columns(cfg, fmt, present), f"detected from the columns {sorted(needs)}")
    if "messages" in present:
        fmt = "sharegpt" if _looks_like_sharegpt(first_row, "messages") else "messages"
        return Choice(fmt, ["messages"], f"detected from the column 'messages' ({fmt} turns)")
    raise LlmkitError(f"data.format auto: the train split's columns {sorted(present)} fit no format. Expected "
                      f"'{cfg.text_column}' (text), prompt + response, messages (role/content), instruction + "
                      "output (alpaca) or conversations (ShareGPT from/value); set data.format and the column keys")


def prompt_of(row: dict) -> tuple[str, str]:
    """An alpaca row as (prompt, response): the instruction, then the input when there is one."""
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise LlmkitError(f"alpaca '{key}' must be a string, got {row.get(key)!r}")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise LlmkitError(f"alpaca 'input' must be a string or empty, got {extra!r}")
    prompt = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return prompt, row["output"]


def sharegpt_messages(turns) -> list[dict]:
    """ShareGPT turns ({from, value}: system / human / gpt) as chat messages ({role, content})."""
    if not isinstance(turns, list) or not turns:
        raise LlmkitError(f"ShareGPT 'conversations' must be a non-empty list of turns, got {turns!r}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise LlmkitError(f"ShareGPT turn {i} must be a mapping with 'from' and 'value', got {t!r}")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise LlmkitError(f"ShareGPT turn {i} is from '{t['from']}'; expected one of "
                              f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(t["value"], str):
            raise LlmkitError(f"ShareGPT turn {i} has a non-text value {t['value']!r}")
        out.append({"role": role, "content": t["value"]})
    if not any(m["role"] == "assistant" for m in out):
        raise LlmkitError("the conversation has no gpt turn: nothing to train on")
    return out


class RowError(LlmkitError):
    """A row of a batch that does not fit its format; `index` is its place in the batch."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LlmkitError(f"a conversation must be a non-empty list of messages, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise LlmkitError(f"message {i} must be a mapping with role system|user|assistant and content, got {m!r}")


def chat_examples(tokenizer, conversations: list[list[dict]], max_length: int | None = None) -> list[dict]:
    """Each conversation rendered with the tokenizer's chat template; only assistant turns carry labels. An
    assistant turn's tokens are what it adds on top of the conversation before it (with the assistant header):
    every prefix is rendered as text and all of them are tokenized in one batched call (the same ids as
    apply_chat_template(tokenize=True), which tokenizes one rendering per call). A bad one raises RowError."""
    if not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("the tokenizer has no chat template; use prompt/response columns, or set one")
    wanted, plans = [], []  # plans[k]: (index of the full render, [(before, upto) render indices per turn])

    def add(messages, generation: bool) -> int:
        wanted.append((messages, generation))
        return len(wanted) - 1

    for k, messages in enumerate(conversations):
        try:
            _check_messages(messages)
        except LlmkitError as exc:
            raise RowError(k, str(exc)) from None
        full = add(messages, False)
        turns = [(add(messages[:i], True), full if i == len(messages) - 1 else add(messages[:i + 1], False))
                 for i, m in enumerate(messages) if m["role"] == "assistant"]
        plans.append((full, turns))
    texts = [""] * len(wanted)
    for generation in (False, True):  # one template call per kind of render
        at = [i for i, (_, g) in enumerate(wanted) if g == generation]
        if at:
            rendered = tokenizer.apply_chat_template([wanted[i][0] for i in at], tokenize=False,
                                                     add_generation_prompt=generation)
            for i, text in zip(at, rendered):
                texts[i] = text
    ids = ids_of(tokenizer, texts)
    out = []
    for k, (full, turns) in enumerate(plans):
        tokens = ids[full]
        labels = [IGNORE] * len(tokens)
        for before, upto in turns:
            b, u = ids[before], ids[upto]
            if tokens[:len(u)] != u or u[:len(b)] != b:
                raise RowError(k, "the chat template does not render a conversation as a prefix of its "
                                  "continuation, so response tokens cannot be located; use prompt/response columns "
                                  "instead")
            labels[len(b):len(u)] = u[len(b):]
        if max_length is not None:
            tokens, labels = tokens[:max_length], labels[:max_length]
        out.append({"input_ids": tokens, "attention_mask": [1] * len(tokens), "labels": labels})
    return out


def chat_example(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """One conversation as `chat_examples` renders it."""
    return chat_examples(tokenizer, [messages], max_length)[0]


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


def _conversation(cfg: DataConfig, fmt: str, row: dict) -> list[dict] | tuple[str, str]:
    """A row's chat messages (messages, sharegpt) or its (prompt, response) (prompt_response, alpaca)."""
    if fmt == "messages":
        return row[cfg.messages_column or "messages"]
    if fmt == "sharegpt":
        return sharegpt_messages(row[cfg.messages_column or "conversations"])
    if fmt == "alpaca":
        return prompt_of(row)
    prompt, response = (row[c] for c in (cfg.prompt_column or "prompt", cfg.response_column or "response"))
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise LlmkitError(f"the {name} must be a string, got {value!r}")
    return prompt, response


def render_rows(cfg: DataConfig, fmt: str, tokenizer, batch: dict[str, list]) -> dict[str, list]:
    """A batch of SFT rows (datasets' batched map) as token ids with response-only labels, plus each row's length
    and trained-token count (columns the loaders and the drop check read without a pass over the rows). Rows go
    through the chat template when the tokenizer has one; a row that does not fit raises RowError."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    parts = []
    for k, row in enumerate(rows):
        try:
            parts.append(_conversation(cfg, fmt, row))
        except LlmkitError as exc:
            raise RowError(k, str(exc)) from None
    if getattr(tokenizer, "chat_template", None):
        examples = chat_examples(tokenizer, [[{"role": "user", "content": p[0]}, {"role": "assistant", "content": p[1]}]
                                             if isinstance(p, tuple) else p for p in parts], cfg.max_length)
    else:
        examples = []
        for k, p in enumerate(parts):
            if not isinstance(p, tuple):
                raise RowError(k, "the tokenizer has no chat template; use prompt/response columns, or set one")
            try:
                examples.append(prompt_response_example(tokenizer, *p, cfg.max_length))
            except LlmkitError as exc:
                raise RowError(k, str(exc)) from None
    out = {key: [ex[key] for ex in examples] for key in ("input_ids", "attention_mask", "labels")}
    out["length"] = [len(ex["input_ids"]) for ex in examples]
    out["trained"] = [sum(t != IGNORE for t in ex["labels"]) for ex in examples]
    return out
