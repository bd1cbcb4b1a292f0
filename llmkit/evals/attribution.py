"""Integrated gradients (Captum) on the input embeddings of a classifier's words, for the two kinds of classifier
llmkit trains: a sequence classifier (each label's logit) and a causal LM scoring label words (each label word's
log-likelihood after the prompt). Either way the attributed score is the label's score less the mean over the
labels: what moves every label alike cancels (the softmax ignores it), and unlike a log-probability it does not
flatten where the model is sure.

Baseline: the same sequence with every token of the text (and of the text pair) replaced by the pad token; the
special tokens, the prompt template, positions and the attention mask are kept. The attributions then split
f(text) - f(the same frame with no words) among the words. The other usual baseline, a zero embedding, is a
vector no token ever had; the pad token's embedding is the model's own "nothing here", so the path stays among
inputs the model has seen, and the kept tokens get exactly zero. `delta` is Captum's convergence delta: how far
the attributions' sum is from that difference (the integral's error at this number of steps)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from llmkit.data import label_prompts, lm
from llmkit.errors import LlmkitError
from llmkit.exported.scoring import LabelWordScorer, pad_id

# a row's integral counts as converged when its delta is within this share of what it explains; a model that
# switches sharply along the path (an over-confident one) needs more steps: it gets them, doubled, up to MAX_STEPS
CONVERGED = 0.05
MAX_STEPS = 256  # Gauss-Legendre steps: a row still over CONVERGED here stays flagged, with its steps, in the report
CHUNK = 16  # steps per forward (the first pass's where more): a raised row needs no more memory than the first


@dataclass
class Frame:
    """One text as the model reads it: ids, the baseline ids, which word (if any) each position belongs to."""
    ids: torch.Tensor  # [1, T]
    baseline: torch.Tensor  # [1, T]: the text's tokens replaced by pad
    word_of: list[int | None]  # per position
    words: list[str]
    pair_from: int | None = None  # index of the text pair's first word
    extra: dict = field(default_factory=dict)  # what scores() needs besides the embeddings


def _frame(ids: list[int], word_of: list[int | None], words: list[str], pad: int, **rest) -> Frame:
    ids_t = torch.tensor([ids])
    baseline = ids_t.clone()
    baseline[0, [i for i, w in enumerate(word_of) if w is not None]] = pad
    return Frame(ids_t, baseline, word_of, words, **rest)


class Classifier:
    """A sequence classifier: each label's logit. Words are the tokenizer's own (its word ids), pieces merged."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.limit = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self.pad = pad_id(tokenizer)

    def frame(self, text: str, text_pair: str | None = None) -> Frame:
        enc = self.tokenizer(text, text_pair, return_offsets_mapping=True, truncation=True, max_length=self.limit)
        spans: dict[tuple, list] = {}  # (segment, word id) -> [start, end]
        keys = []
        for pos, (seq, word) in enumerate(zip(enc.sequence_ids(0), enc.word_ids(0))):
            special = word is None or seq is None
            keys.append(None if special else (seq, word))
            if not special:
                start, end = enc["offset_mapping"][pos]
                span = spans.setdefault((seq, word), [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)
        order = sorted(spans)
        index = {k: i for i, k in enumerate(order)}
        words = [(text if seq == 0 else text_pair)[s:e] for (seq, _), (s, e) in ((k, spans[k]) for k in order)]
        pair_from = next((i for i, (seq, _) in enumerate(order) if seq == 1), None)
        extra = {k: torch.tensor([enc[k]]) for k in ("attention_mask", "token_type_ids") if k in enc}
        return _frame(enc["input_ids"], [None if k is None else index[k] for k in keys], words, self.pad,
                      pair_from=pair_from, extra=extra)

    def scores(self, embeds: torch.Tensor, frame: Frame) -> torch.Tensor:
        n = embeds.shape[0]
        extra = {k: v.expand(n, -1) for k, v in frame.extra.items()}
        return self.model(inputs_embeds=embeds, **extra).logits.float()


def _slots(template: str, text: str, pair: str | None) -> list[tuple[int, int, int]]:
    """(start, end, segment) of every place the text (segment 0) and pair (1) land in render_prompt's output."""
    out, at, pos = [], 0, 0
    marks = {"{text}": (0, text), "{text_pair}": (1, pair)} if pair is not None else {"{text}": (0, text)}
    pattern = re.compile("|".join(re.escape(m) for m in marks))
    for m in pattern.finditer(template):
        pos += m.start() - at
        segment, value = marks[m.group()]
        out.append((pos, pos + len(value), segment))
        pos, at = pos + len(value), m.end()
    return out


class LabelWords(LabelWordScorer):
    """A label-word causal LM (exported.scoring.LabelWordScorer: each label's score is its word's log-likelihood
    after the run's prompt) whose text's words are attributed; words are the text's whitespace-separated words."""

    def _prefix_text(self, prompt: str) -> tuple[str, bool]:
        """The string the prompt part of every candidate was tokenized from, and whether special tokens were added."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True), False
        return prompt, True

    def frame(self, text: str, text_pair: str | None = None) -> Frame:
        text, prefix, words = self.prompt(text, text_pair)
        prompt = label_prompts.render_prompt(self.template, text, text_pair)
        string, special = self._prefix_text(prompt)
        enc = self.tokenizer(string, add_special_tokens=special, return_offsets_mapping=True)
        start = string.find(prompt)
        if enc["input_ids"] != prefix or start < 0:
            raise LlmkitError("this tokenizer does not map the prompt's tokens back to its text, so its words cannot "
                              "be attributed")
        # every word of the text and pair, by character range in `string`
        ranges = []  # (start, end, segment, word key)
        for s, _, segment in _slots(self.template, text, text_pair):
            value = text if segment == 0 else text_pair
            for w in re.finditer(r"\S+", value):
                ranges.append((start + s + w.start(), start + s + w.end(), segment, (segment, w.group(), w.start())))
        keys = sorted({r[3] for r in ranges}, key=lambda k: (k[0], k[2]))  # text first, then pair; repeats merged
        index = {k: i for i, k in enumerate(keys)}
        word_of = []
        for s, e in enc["offset_mapping"]:
            s += len(string[s:e]) - len(string[s:e].lstrip())  # a leading space belongs to no word
            word_of.append(next((index[k] for a, b, _, k in ranges if a <= s < b), None))
        pair_from = next((i for i, k in enumerate(keys) if k[0] == 1), None)
        suffixes = [(torch.tensor(ids), torch.tensor(targets)) for ids, targets in words]
        return _frame(prefix, word_of, [k[1] for k in keys], self.pad, pair_from=pair_from,
                      extra={"suffixes": suffixes})

    def scores(self, embeds: torch.Tensor, frame: Frame) -> torch.Tensor:
        n = embeds.shape[0]
        table = self.model.get_input_embeddings()
        out = []
        for ids, targets in frame.extra["suffixes"]:  # one forward per label word (a handful of labels)
            rest = table(ids)[None].expand(n, -1, -1).to(embeds.dtype)
            # logits only where the word's tokens are predicted (the prompt's last position, the word's but its
            # last): not every position's over the vocabulary, as the scorer keeps them (issue 50)
            logits = self.model(inputs_embeds=torch.cat([embeds, rest], 1), logits_to_keep=len(ids) + 1).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            picked = logp.gather(-1, targets.clamp(min=0)[None, :, None].expand(n, -1, 1))[..., 0]
            out.append((picked * (targets != lm.IGNORE)).sum(-1))
        return torch.stack(out, -1)


def _integrate(ig, inputs, baseline, frame: Frame, label: int, steps: int, chunk: int) -> tuple[list, float, float]:
    """One label's integral at `steps`: per word its attribution, the delta, and the change it explains; `chunk`
    steps per forward (CHUNK)."""
    attr, delta = ig.attribute(inputs, baselines=baseline, additional_forward_args=(label,), n_steps=steps,
                               internal_batch_size=min(chunk, steps), return_convergence_delta=True)
    per_word = [0.0] * len(frame.words)
    for pos, value in enumerate(attr.sum(-1)[0].tolist()):
        if frame.word_of[pos] is not None:
            per_word[frame.word_of[pos]] += value
    # Captum's delta: sum - (f(x) - f(baseline))
    return [round(a, 6) for a in per_word], abs(float(delta)), round(sum(per_word) - float(delta), 6)


def converged(delta: float, change: float, tolerance: float = CONVERGED) -> bool:
    """Whether an integral's delta is within `tolerance` of what it explains (1e-3 of slack for a change near 0)."""
    return delta <= tolerance * abs(change) + 1e-3


def explain(subject, texts: list[str], pairs: list[str | None] | None = None, steps: int = 16,
            max_steps: int = MAX_STEPS, tolerance: float = CONVERGED) -> list[dict]:
    """For each text (and pair): its words, each word's attribution toward every label, per label the convergence
    delta and the change it explains (centred score at the text less at the baseline), whether the integral
    converged, the steps it took, the probabilities over the labels and the prediction. A label whose delta is
    over `tolerance` of its change is integrated again with twice the steps, until it passes or reaches
    `max_steps`; only those labels of that row are redone."""
    from captum.attr import IntegratedGradients

    names = subject.names
    table = subject.model.get_input_embeddings()
    out = []
    for text, pair in zip(texts, pairs or [None] * len(texts)):  # one at a time: IG batches its steps
        frame = subject.frame(text, pair)

        def centred(embeds, label, frame=frame):
            s = subject.scores(embeds, frame)
            return s[:, label] - s.mean(-1)

        ig = IntegratedGradients(centred)
        with torch.no_grad():
            inputs, baseline = table(frame.ids).detach(), table(frame.baseline).detach()
            probs = torch.softmax(subject.scores(inputs, frame)[0], -1)
        # two labels: the first's centred score is minus the second's, so one integral explains both
        todo, done, used = list(enumerate(names))[1 if len(names) == 2 else 0:], {}, steps
        while True:
            for label, name in todo:
                done[name] = _integrate(ig, inputs, baseline, frame, label, used, max(steps, CHUNK))
            todo = [(label, name) for label, name in todo if not converged(*done[name][1:], tolerance)]
            if not todo or used >= max_steps:
                break
            used = min(2 * used, max_steps)
        if len(names) == 2:
            attr, delta, change = done[names[1]]
            done[names[0]] = ([-a for a in attr], delta, -change)
        attributions = {n: done[n][0] for n in names}
        deltas, changes = {n: done[n][1] for n in names}, {n: done[n][2] for n in names}
        row = {"text": text, "words": frame.words, "attributions": attributions, "delta": deltas, "change": changes,
               "converged": all(converged(deltas[n], changes[n], tolerance) for n in names), "steps": used,
               "probabilities": [round(float(p), 6) for p in probs], "prediction": names[int(probs.argmax())]}
        if pair is not None:
            row.update(text_pair=pair, pair_from=frame.pair_from)
        out.append(row)
    return out
