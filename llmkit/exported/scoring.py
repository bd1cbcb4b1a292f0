"""The one scorer of each kind of export, for every command and library path that scores one: a classifier's
logits over rows (any runtime's forward: PyTorch, ONNX Runtime), a label-word causal LM's score per label (its
word's log-likelihood after the run's prompt), a causal LM's token log-likelihoods and their text's negative
log-likelihood. Perplexity itself is metrics.perplexity."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkit.data import label_prompts, lm
from llmkit.errors import LlmkitError
from llmkit.model import lm_head


def token_logprobs(model, batch, chunk: int = lm_head.CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target-token log-likelihoods, and target-token counts (targets -100 are skipped).
    Only the targets' positions projected onto the vocabulary, `chunk` at a time (train.loss_chunk, model.lm_head),
    where that gives this model's logits; `chunk` 0: the full logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if chunk and lm_head.inexact(model) is None:
        return lm_head.target_logprobs(model, inputs, batch["targets"], chunk)
    logits = model(**inputs).logits.float()
    targets = batch["targets"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none")
    mask = (targets != -100).float()
    return -(token_loss.view(targets.shape) * mask).sum(1), mask.sum(1)


@torch.inference_mode()
def text_nll(model, tokenizer, texts: list[str], max_length: int, rows: int = 8) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of the texts (each cut to max_length tokens), and the tokens, as
    the run's own evaluation sums them (token_logprobs)."""
    total, count = 0.0, 0
    for lo in range(0, len(texts), rows):
        enc = tokenizer(texts[lo:lo + rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        targets = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, lm.IGNORE)
        logp, tokens = token_logprobs(model, {**enc, "targets": targets})
        total, count = total - float(logp.sum()), count + int(tokens.sum())
    return total, count


def torch_predictor(model):
    """A PyTorch classifier as the forward classifier_logits takes: numpy inputs in, numpy logits out."""
    def predict(enc: dict) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.float().numpy()
    return predict


def classifier_logits(predict, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
                      batch_size: int, by_length: bool = True, progress: bool = False) -> np.ndarray:
    """A sequence classifier's logits of every row, in the rows' order. `predict`: numpy inputs -> logits (a
    PyTorch model through torch_predictor, an ONNX Runtime session). `by_length`: rows of similar length batched
    together (little padding); off, batches follow the rows (what a timing of served batches wants)."""
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if by_length else list(range(len(texts)))
    out = None
    for b in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress):
        idx = order[b:b + batch_size]
        enc = tokenizer([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, padding=True,
                        truncation=True, max_length=limit, return_tensors="np")
        logits = predict(dict(enc))
        if out is None:
            out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LlmkitError("the tokenizer has neither a pad nor an eos token, which scoring and the attribution "
                          "baseline need")
    return pad


class LabelWordScorer:
    """A causal LM that classifies by label words (recipes/causal_lm.py with data.prompt_template): each label's
    score is its word's log-likelihood after the prompt, the same sum the run's evaluation ranks. The prompt is
    built exactly as for training and scoring (data.label_prompts.fit_text: the chat template when the tokenizer
    has one, the text cut once to data.max_length)."""

    def __init__(self, model, tokenizer, template: str, label_words: list[str], names: list[str], max_length: int):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.label_words, self.names, self.max_length = label_words, names, max_length
        self.pad = pad_id(tokenizer)

    def prompt(self, text: str, text_pair: str | None = None) -> tuple[str, list[int], list[tuple[list, list]]]:
        """The text as it lands in the prompt (cut to fit), the prompt's ids, and per label word its tokens and
        their targets after it."""
        text, examples = label_prompts.fit_text(self.tokenizer, self.template, text, self.label_words,
                                                self.max_length, text_pair)
        first = next(i for i, t in enumerate(examples[0]["labels"]) if t != lm.IGNORE)
        prefix = examples[0]["input_ids"][:first]
        if any(e["input_ids"][:first] != prefix for e in examples):
            raise LlmkitError("the label words change the prompt's tokens, so they cannot be scored after one prompt")
        return text, prefix, [(e["input_ids"][first:], e["labels"][first:]) for e in examples]

    @torch.no_grad()
    def batch_scores(self, texts: list[str], pairs: list[str | None] | None = None, rows: int = 16) -> torch.Tensor:
        """Each label word's log-likelihood after its prompt, for many texts, `rows` texts per forward. The prompt
        is run once per text (left-padded, so the prompts end together) and each label word's tokens continue from
        its cache: a label word costs a few tokens, not another pass over the prompt."""
        found = []  # per text: the prompt's ids, and per label word its tokens and their targets
        for i, text in enumerate(texts):
            _, prefix, words = self.prompt(text, pairs[i] if pairs else None)
            found.append((prefix, words))
        out = torch.zeros(len(texts), len(self.label_words))
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        order = sorted(range(len(texts)), key=lambda j: len(found[j][0]))  # similar lengths together: little padding
        for lo in range(0, len(order), rows):
            idx = order[lo:lo + rows]
            width = max(len(found[j][0]) for j in idx)
            mask = torch.tensor([[0] * (width - len(found[j][0])) + [1] * len(found[j][0]) for j in idx])
            ids = torch.tensor([[self.pad] * (width - len(found[j][0])) + found[j][0] for j in idx])
            head = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                              use_cache=True, logits_to_keep=1)
            cache = head["cache"] if "cache" in head else head["past_key_values"]  # renamed in transformers 5.2x
            first_logp = torch.log_softmax(head.logits[:, -1].float(), -1)
            for c in range(len(self.label_words)):
                size = max(len(found[j][1][c][0]) for j in idx)
                tail = torch.tensor([found[j][1][c][0] + [self.pad] * (size - len(found[j][1][c][0])) for j in idx])
                targets = torch.tensor([found[j][1][c][1] + [lm.IGNORE] * (size - len(found[j][1][c][1]))
                                        for j in idx])
                both = torch.cat([mask, (targets != lm.IGNORE) | (tail != self.pad)], 1).long()
                # the label word's first token is predicted at the prompt's end, each next one by the token before:
                # the word's last position predicts nothing scored, so its logits are not made
                logits = self.model(input_ids=tail, attention_mask=both, use_cache=True, **{cache_arg: cache},
                                    position_ids=mask.sum(1, keepdim=True) + torch.arange(size),
                                    logits_to_keep=torch.arange(size - 1)).logits.float()
                cache.crop(-size)  # back to the prompts alone for the next label word
                logp = torch.cat([first_logp[:, None], torch.log_softmax(logits, -1)], 1)
                picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
                out[idx, c] = (picked * (targets != lm.IGNORE)).sum(-1)
        return out
