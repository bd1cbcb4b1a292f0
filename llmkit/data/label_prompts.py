"""Label-word prompts (data.prompt_template): a row's text put into the template and cut, never the label word, to
fit data.max_length; one example per label word after the same prompt. Training, evaluation and every command that
scores label words render through here."""

from __future__ import annotations

from llmkit.data import formats
from llmkit.errors import LlmkitError


def render_prompt(template: str, text: str, text_pair: str | None = None) -> str:
    """Put a row's text into the prompt template (plain replacement: other braces in the template stay as they are)."""
    out = template.replace("{text}", text)
    return out.replace("{text_pair}", text_pair) if text_pair is not None else out


def fit_prompt(tokenizer, template: str, text: str, response: str, max_length: int, text_pair: str | None = None):
    """prompt_response_example for `text` in `template`, with the text cut (never the response) to fit."""
    return _fit(tokenizer, template, text, response, max_length, text_pair)[1]


def fit_text(tokenizer, template: str, text: str, responses: list[str], max_length: int,
             text_pair: str | None = None) -> tuple[str, list[dict]]:
    """The one rendering of a label-word prompt (the run's evaluation and every command score through it): the
    text as it lands in the prompt, cut once so that it fits after every response, and one example per response.
    Cutting per response would score label words of different token lengths after different prompts."""
    cut = min((_fit(tokenizer, template, text, r, max_length, text_pair)[0] for r in responses), key=len)
    return cut, [_fit(tokenizer, template, cut, r, max_length, text_pair)[1] for r in responses]


def _fit(tokenizer, template: str, text: str, response: str, max_length: int, text_pair: str | None):
    example = formats.prompt_response_example(tokenizer, render_prompt(template, text, text_pair), response)
    over = len(example["input_ids"]) - max_length
    if over <= 0:
        return text, example
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while over > 0:
        keep = len(ids) - over - 1
        if keep <= 0:
            raise LlmkitError(f"data.max_length {max_length} leaves no room for the text: the prompt template and "
                              f"response '{response}' alone take {len(example['input_ids']) - len(ids)} tokens. "
                              "Raise data.max_length or shorten data.prompt_template.")
        ids = ids[:keep]
        text = tokenizer.decode(ids)
        example = formats.prompt_response_example(tokenizer, render_prompt(template, text, text_pair), response)
        over = len(example["input_ids"]) - max_length
    return text, example


def label_candidates(tokenizer, cfg, words: list[str], text: str, text_pair: str | None = None) -> dict:
    """One rendered sequence per label word for the same prompt, and the response-token targets of each."""
    examples = fit_text(tokenizer, cfg.prompt_template, text, words, cfg.max_length, text_pair)[1]
    return {"candidates": [e["input_ids"] for e in examples], "targets": [e["labels"] for e in examples]}
