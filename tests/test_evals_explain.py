"""Token attributions (llmkit.evals.explain): complete (they add up to what they explain, within the reported
delta), pointed at the word that decides the label, words rather than sub-tokens, and `llmkit explain`."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from helpers import FILLER, THREE_CLASSES, build_three_class_run, build_tiny_bert

from llmkit.errors import LlmkitError
from llmkit.evals import attribution, explain

PLANTED = "superb"  # label 1 exactly when a row holds it


def _rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), PLANTED)
        rows.append((" ".join(words), i % 2))
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The tiny BERT trained in-process until a planted word decides its label; saved as an export."""
    out = build_tiny_bert(tmp_path_factory.mktemp("planted"))
    subject = explain.load(out)
    model, tok = subject.model, subject.tokenizer
    torch.manual_seed(0)
    # it learns the rule but stays unsure (p ~0.63): trained harder, this tiny BERT turns into a switch along the
    # integration path, and its deltas grow past what they explain (test_sharp_models_are_flagged)
    opt = torch.optim.AdamW(model.parameters(), lr=7e-4)
    model.train()
    rows = _rows(192, 1)
    for _ in range(4):
        for i in range(0, len(rows), 16):
            batch = rows[i:i + 16]
            enc = tok([t for t, _ in batch], padding=True, return_tensors="pt")
            model(**enc, labels=torch.tensor([y for _, y in batch])).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval().save_pretrained(out)
    return out


def test_attributions_add_up_and_find_the_planted_word(planted):
    subject = explain.load(planted)
    model, tok = subject.model, subject.tokenizer
    rows = _rows(12, 7)
    done = explain.explain(subject, [t for t, _ in rows], steps=64)
    for (text, label), row in zip(rows, done):
        assert row["prediction"] == model.config.id2label[label], text  # it learned the rule
        enc = tok(text, return_tensors="pt")
        empty = enc["input_ids"].clone()
        empty[0, 1:-1] = tok.pad_token_id  # the baseline: no words, [CLS] and [SEP] kept
        with torch.no_grad():
            f = model(**enc).logits[0]
            f0 = model(input_ids=empty, attention_mask=enc["attention_mask"]).logits[0]
            f, f0 = f - f.mean(), f0 - f0.mean()  # each label's logit over the mean: what is explained
        for c, name in model.config.id2label.items():
            total = sum(row["attributions"][name])
            # completeness: what the words get is what the text changes over the baseline, to the integral's delta
            assert abs(total - float(f[c] - f0[c])) <= row["delta"][name] + 1e-5 * len(row["words"]), (text, name)
            assert row["delta"][name] < 1e-3 and row["converged"]  # and the integral did converge
            assert row["change"][name] == pytest.approx(float(f[c] - f0[c]), abs=1e-4)
        assert row["words"] == text.split()
        if label:  # the planted word takes the largest share toward the label it decides
            toward = row["attributions"][model.config.id2label[1]]
            assert row["words"][toward.index(max(toward))] == PLANTED, (text, toward)


def test_a_row_over_the_tolerance_is_integrated_again_with_more_steps(planted, monkeypatch, capsys):
    """Issue 47: a row whose delta is over 5% of what it explains at the start steps is integrated again with
    twice the steps until it passes or reaches the bound; only those rows are, and each row records its steps."""
    subject = explain.load(planted)
    texts = [t for t, _ in _rows(6, 7)]
    steps = []  # the steps of every integral computed, in order
    real = attribution._integrate
    monkeypatch.setattr(attribution, "_integrate", lambda *a: steps.append(a[5]) or real(*a))
    start = attribution.explain(subject, texts, steps=2, max_steps=2)  # 2 steps, never raised
    flagged = [i for i, r in enumerate(start) if not r["converged"]]
    assert flagged and len(flagged) < len(texts) and all(r["steps"] == 2 for r in start)
    steps.clear()
    done = attribution.explain(subject, texts, steps=2, max_steps=64)
    for i, row in enumerate(done):
        assert row["converged"] and all(attribution.converged(row["delta"][n], row["change"][n]) for n in row["delta"])
        assert (row["steps"] > 2) == (i in flagged), (i, row["steps"])  # only the rows that failed were redone
        if i in flagged:
            assert max(row["delta"].values()) < max(start[i]["delta"].values())
    # one integral per pass (two labels: one explains both), each pass twice the last one's steps
    assert steps == [s for row in done for s in (2 ** k for k in range(1, row["steps"].bit_length()))]
    raised = sum(r["steps"] > 2 for r in done)
    assert explain.steps_note(done, 2, 64) == (
        f"2 steps, raised (doubled, up to {max(r['steps'] for r in done)}) for the {raised} of 6 rows whose delta "
        "at 2 was over 5% of what they explain")
    # a bound too low for some rows: they stay flagged, with the steps they got, and the note says so
    bounded = attribution.explain(subject, texts, steps=2, max_steps=4)
    left = [r for r in bounded if not r["converged"]]
    assert left and all(r["steps"] == 4 for r in left)
    assert explain.steps_note(bounded, 2, 4).endswith(f"; {len(left)} row{'s' if len(left) > 1 else ''} still over "
                                                      "5% at the bound of 4 steps, flagged")
    from llmkit.report import explained  # and the report marks them, and each raised row's steps

    doc = {"split": "test", "steps": 2, "seconds": 1.0, "baseline": "pads", "summary": {},
           "rows": [{**r, "label": r["prediction"]} for r in bounded], "steps_note": explain.steps_note(bounded, 2, 4)}
    md = "\n".join(explained.md_section(doc, ["LABEL_0", "LABEL_1"]))
    assert md.count(" (delta over 5% even at 4 steps, the bound) |") == len(left)
    assert md.count(" (4 steps) |") == sum(r["steps"] == 4 for r in bounded) and "still over 5% at the bound" in md
    from llmkit.cli import main  # `llmkit explain` says what it raised

    main(["explain", str(planted), "--text", texts[flagged[0]], "--steps", "2", "--max-steps", "64"])
    out = capsys.readouterr().out
    assert f"integration steps: {done[flagged[0]]['steps']} (raised from 2: the delta was over 5%" in out
    assert "integrated gradients at 2 steps, raised (doubled, up to" in out


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A 3-label run folder with explained rows (helpers.build_three_class_run: in-process, no launch)."""
    return build_three_class_run(tmp_path_factory.mktemp("three") / "run")


def _cells(page: str, kind: str) -> list[str]:
    """The text of every <td class='kind'> cell of a page, tags dropped."""
    import re

    return [re.sub(r"<[^>]+>", " ", c) for c in re.findall(rf"<td class='{kind}'>(.*?)</td>", page)]


def test_a_three_class_legend_names_each_rows_prediction(three_classes):
    """Issue 47: with more than two labels the colours are about each row's own prediction, so each row's key
    names its class ("toward neutral (the prediction)", "away from neutral"); no "toward against" anywhere, in the
    run report and on the compare page."""
    import json
    import re
    from html import unescape

    from llmkit.report import compared, explained

    doc = json.loads((three_classes / "explanations.json").read_text())
    rows = doc["rows"]
    assert len({r["prediction"] for r in rows}) == 3  # the rows' predictions differ: one legend could not fit all
    page = explained.html_section(doc, THREE_CLASSES)
    keys = _cells(page, "key")
    predicted = re.findall(r"</td><td>[^<]*</td><td>([a-z]+)[^<]*</td><td>[0-9.]+</td>", page)
    assert len(keys) == len(rows) and predicted == [r["prediction"] for r in rows]
    for key, row in zip(keys, rows):
        assert f"toward {row['prediction']} (the prediction)" in key and f"away from {row['prediction']}" in key
    assert "pushes toward the row's predicted class" in unescape(page) and "pushes away from it" in page
    md = "\n".join(explained.md_section(doc, THREE_CLASSES))
    assert "Top words toward the row's predicted class (+) and away from it (-)" in md
    assert all(f"| toward {r['prediction']}: " in md for r in rows)
    assert doc["raised"] == sum(r["steps"] > doc["steps"] for r in rows)
    for text in (page, md):
        assert ("raised (doubled, up to" in text) == bool(doc["raised"]) and "toward against" not in text
    # the compare page: each model's row names that model's own prediction
    both = {"labels": THREE_CLASSES, "disagreements": [
        {"a": "model-1", "b": "model-2", "label": rows[0]["label"], "text": rows[0]["text"],
         "predictions": {f"model-{k + 1}": {"prediction": r["prediction"], "probability": max(r["probabilities"]),
                                            "explanation": r} for k, r in enumerate(rows[:2])}}]}
    shown = compared._disagreements_html(both)
    assert [k.split()[:2] for k in _cells(shown, "key")] == [["toward", r["prediction"]] for r in rows[:2]]
    assert "toward against" not in shown and "toward the row's predicted class" in unescape(shown)
    binary = {**both, "labels": ["neg", "pos"]}  # two labels: one legend, the labels by name
    for r in rows[:2]:
        r["attributions"] = {"neg": r["attributions"]["negative"], "pos": r["attributions"]["positive"]}
    shown = compared._disagreements_html(binary)
    assert "toward pos</span>" in shown and "toward neg</span>" in shown and "class='key'" not in shown


def test_word_pieces_are_merged_into_words():
    from transformers import AutoTokenizer

    from llmkit import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve("asset:minilm"))
    labels = SimpleNamespace(config=SimpleNamespace(id2label={0: "neg", 1: "pos"}, num_labels=2))
    text = "Unbelievably charming, isn't it?"
    frame = attribution.Classifier(labels, tok).frame(text)
    assert frame.ids.shape[1] > len(text.split()) + 2  # the tokenizer does split it into pieces
    assert "".join(frame.words) == text.replace(" ", "")  # every character once, words as written
    assert frame.words[:2] == ["Unbelievably", "charming"] and frame.word_of.count(0) > 1  # pieces of one word
    assert frame.word_of[0] is None and frame.word_of[-1] is None  # [CLS], [SEP]: kept in the baseline
    assert (frame.baseline[0, 1:-1] == tok.pad_token_id).all() and frame.baseline[0, 0] == frame.ids[0, 0]
    pair = attribution.Classifier(labels, tok).frame("Fine.", "Really fine")
    assert pair.words == ["Fine", ".", "Really", "fine"] and pair.pair_from == 2  # the pair's words follow


def test_rows_chosen_and_summarised():
    rows = [{"row": i, "text": f"t{i}", "label": "pos" if i % 2 else "neg",
             "prediction": "pos" if i % 3 else "neg", "probabilities": [0.5 - i / 100, 0.5 + i / 100]}
            for i in range(30)]
    chosen = explain.choose(rows, 8, seed=0)
    mistakes = [r for r in chosen if r["prediction"] != r["label"]]
    assert len(chosen) == 8 and len(mistakes) == 4
    assert all(max(m["probabilities"]) >= max(r["probabilities"]) for m in mistakes for r in rows
               if r["prediction"] != r["label"] and r not in mistakes)  # the most confident mistakes
    assert {r["label"] for r in chosen if r not in mistakes} == {"pos", "neg"}  # correct ones of each class
    summary = explain.summary([{"words": ["a", "Good", "film"], "attributions": {"pos": [0.1, 2.0, -1.0],
                                                                             "neg": [0.0, -2.0, 1.0]}}])
    assert summary == {"pos": [["good", 1], ["a", 1]], "neg": [["film", 1]]}


def test_llmkit_explain_prints_and_refuses(planted, tmp_path, capsys):
    from llmkit.cli import main

    (tmp_path / "texts.txt").write_text(f"the plot was {PLANTED}\n\nthe movie\n")
    main(["explain", str(planted), "--file", str(tmp_path / "texts.txt"), "--steps", "8"])
    out = capsys.readouterr().out
    assert out.count("predicted: ") == 2 and f"{PLANTED} +" in out and "toward LABEL_1 (delta " in out
    with pytest.raises(SystemExit) as stop:
        main(["explain", str(tmp_path), "--text", "hi"])  # not a model folder
    assert stop.value.code == 2
    assert "holds no exported model" in capsys.readouterr().err
    with pytest.raises(LlmkitError, match="give --prompt-template and --label-words"):
        (tmp_path / "lm").mkdir()
        (tmp_path / "lm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
        explain.load(tmp_path / "lm")  # a causal LM with no run records: what would it classify by?
    with pytest.raises(LlmkitError, match="neither a sequence classifier nor a causal LM"):
        (tmp_path / "lm" / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
        explain.load(tmp_path / "lm")


def test_a_near_tie_that_flips_in_fp32_is_marked_not_fatal():
    """A bf16/fp16 run's near tie may come out the other way in the explaining fp32 process: the row stays in the
    report, marked with what the run said, beside the mistakes."""
    from llmkit.report import explained

    row = {"text": "a fine film", "words": ["a", "fine", "film"], "label": "pos", "prediction": "neg",
           "run_prediction": "pos", "probabilities": [0.501, 0.499], "delta": {"neg": 1e-4, "pos": 1e-4},
           "attributions": {"neg": [0.0, -0.2, 0.1], "pos": [0.0, 0.2, -0.1]}}
    same = {**row, "prediction": "pos", "probabilities": [0.499, 0.501], "run_prediction": "pos"}
    doc = {"split": "test", "steps": 16, "seconds": 1.0, "rows": [row, same], "summary": explain.summary([row, same]),
           "baseline": "pad tokens"}
    page = explained.html_section(doc, ["neg", "pos"])
    table = "\n".join(explained.md_section(doc, ["neg", "pos"]))
    assert "pushes toward pos</span>" in page and "pushes toward neg</span>" in page and "class='key'" not in page
    for text in (page, table):
        assert "neg (mistake) (the run: pos)" in text
        assert text.count("(the run:") == 1  # the row that agrees is not marked


LM_TEMPLATE = "is this {text}"
LM_FILLER = ["you", "are", "helpful", "film", "hi"]  # none of them in the template or the chat frame
LM_LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def label_words(tiny_lm):
    """The tiny Llama trained in-process to answer positive exactly when the text holds "good"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data import label_prompts, lm

    tok = AutoTokenizer.from_pretrained(tiny_lm / "model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm / "model", dtype=torch.float32)
    rng = random.Random(3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):  # ~2 s; sure of the rule after ~60 steps
        batch = []
        for i in range(16):
            words = rng.choices(LM_FILLER, k=rng.randint(2, 5))
            if i % 2:
                words.insert(rng.randrange(len(words) + 1), "good")
            batch.append(label_prompts.fit_prompt(tok, LM_TEMPLATE, " ".join(words), LM_LABELS[i % 2], 32))
        width = max(len(e["input_ids"]) for e in batch)
        def pad(key, value, batch=batch, width=width):
            return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in batch])

        model(input_ids=pad("input_ids", 0), attention_mask=pad("attention_mask", 0),
              labels=pad("labels", lm.IGNORE)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def _label_score(model, tok, text: str, baseline: bool) -> list[float]:
    """Each label word's summed log-likelihood after the prompt, computed here from the training examples; the
    baseline swaps the text's tokens in the prompt for pad."""
    from llmkit.data import label_prompts, lm

    words = set(tok(text, add_special_tokens=False)["input_ids"])
    out = []
    for answer in LM_LABELS:
        ex = label_prompts.fit_prompt(tok, LM_TEMPLATE, text, answer, 32)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
        first = int((labels != lm.IGNORE).nonzero()[0])
        if baseline:
            ids[0, :first] = torch.tensor([tok.pad_token_id if t in words else t for t in ex["input_ids"][:first]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(sum(float(logp[p - 1, labels[p]]) for p in range(first, len(labels)) if labels[p] != lm.IGNORE))
    return out


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-prompt"])
def test_label_word_attributions_add_up_and_find_the_planted_word(label_words, chat):
    """Label-word classification: the words' attributions split the centred label log-likelihood's change over
    the baseline, and "good" (which decides the answer) takes the largest share toward positive."""
    import copy

    model, tok = label_words
    if not chat:
        tok = copy.deepcopy(tok)
        tok.chat_template = None  # the prompt as plain text (plus EOS after the answer)
    subject = attribution.LabelWords(model, tok, LM_TEMPLATE, LM_LABELS, LM_LABELS, 32)
    texts = ["you are good", "hi film", "film good hi you", "helpful you are"]
    # "good" moves the answer by ~12 nats, sharply along the path: 128 steps for a delta of ~1% of that
    for text, row in zip(texts, explain.explain(subject, texts, steps=128)):
        assert row["words"] == text.split()
        f, f0 = _label_score(model, tok, text, False), _label_score(model, tok, text, True)
        for c, name in enumerate(LM_LABELS):
            want = (f[c] - sum(f) / 2) - (f0[c] - sum(f0) / 2)
            assert abs(sum(row["attributions"][name]) - want) <= row["delta"][name] + 1e-4, (text, name, chat)
            assert row["converged"], (text, row["delta"], want)  # the delta is under 5% of what it explains
        if chat:  # the model was trained with the chat template: it learned the rule there
            assert row["prediction"] == ("positive" if "good" in text else "negative"), text
            if "good" in text:
                toward = row["attributions"]["positive"]
                assert row["words"][toward.index(max(toward))] == "good", (text, toward)


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-prompt"])
def test_label_words_scored_in_batches_as_one_by_one(label_words, chat):
    """`llmkit eval` scores label words many texts per forward (left-padded, only the last logits): the same
    numbers as the one-text scores the explanations integrate (their logits only at the word's positions), and as
    the training examples give."""
    import copy

    model, tok = label_words
    if not chat:
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    subject = attribution.LabelWords(model, tok, LM_TEMPLATE, LM_LABELS, LM_LABELS, 32)
    texts = ["you are good", "hi", "film good hi you are helpful film", "helpful you are", "good"]
    batched = subject.batch_scores(texts, rows=3)  # batches of 3 texts: padding inside and across batches
    for text, got in zip(texts, batched):
        frame = subject.frame(text)
        widths = []  # positions the head projects: the ones predicting a word's tokens, not the prompt's
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o, seen=widths: seen.append(o.shape[1]))
        with torch.no_grad():
            one = subject.scores(model.get_input_embeddings()(frame.ids), frame)[0]
        hook.remove()
        assert widths == [len(ids) + 1 for ids, _ in frame.extra["suffixes"]], widths
        assert torch.allclose(got, one, atol=1e-4), (text, got, one)
        assert got.tolist() == pytest.approx(_label_score(model, tok, text, False), abs=1e-4)


def test_text_pairs_are_explained_in_both_texts(planted):
    """A text-pair classifier: both texts' words get attributions (the pair's after pair_from), and they add up to
    the change over the baseline with both texts replaced."""
    subject = explain.load(planted)
    model, tok = subject.model, subject.tokenizer
    text, pair = f"the {PLANTED} plot", "a quite dull film"  # words of the vocabulary: no [UNK], which the
    # independent baseline below would keep as a special token
    row = explain.explain(subject, [text], [pair], steps=64)[0]
    assert row["words"] == (text + " " + pair).split() and row["pair_from"] == 3 and row["text_pair"] == pair
    enc = tok(text, pair, return_tensors="pt")
    empty = enc["input_ids"].clone()
    special = torch.tensor(tok.get_special_tokens_mask(empty[0].tolist(), already_has_special_tokens=True)).bool()
    empty[0, ~special] = tok.pad_token_id
    with torch.no_grad():
        f = model(**enc).logits[0]
        f0 = model(input_ids=empty, attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]).logits[0]
    f, f0 = f - f.mean(), f0 - f0.mean()
    for c, name in model.config.id2label.items():
        assert abs(sum(row["attributions"][name]) - float(f[c] - f0[c])) <= row["delta"][name] + 1e-5
        assert row["delta"][name] < 1e-3
    assert any(v != 0 for v in row["attributions"][name][row["pair_from"]:])  # the pair's words count too


def test_report_section_marks_pairs_and_changed_predictions():
    from llmkit.report import explained

    row = {"words": ["good", "film", "bad"], "attributions": {"neg": [-1.0, 0.1, 0.5], "pos": [1.0, -0.1, -0.5]},
           "delta": {"neg": 1e-4, "pos": 1e-4}, "probabilities": [0.4, 0.6], "prediction": "pos", "label": "pos",
           "run_prediction": "neg", "text": "good film", "text_pair": "bad", "pair_from": 2, "row": 0}
    doc = {"split": "test", "rows": [row], "steps": 16, "baseline": "pads", "seconds": 1.0,
           "summary": {"pos": [["good", 1]]}}
    page = explained.html_section(doc, ["neg", "pos"])
    assert page.index("film</span>") < page.index("&#8214;") < page.index(">bad</span>")  # where the pair begins
    assert "(the run: neg)" in page  # the explaining model's fp32 prediction differs from the run's
    table = "\n".join(explained.md_section(doc, ["neg", "pos"]))
    assert "good film // bad" in table and "(the run: neg)" in table
