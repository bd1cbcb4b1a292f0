"""Token attributions (llmkit.evals.explain): complete (they add up to what they explain, within the reported
delta), pointed at the word that decides the label, words rather than sub-tokens, and `llmkit explain`."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import FILLER, build_tiny_bert

from llmkit.errors import LlmkitError
from llmkit.evals import explain

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
    model, tok = explain.load(out)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
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
    model, tok = explain.load(planted)
    rows = _rows(12, 7)
    done = explain.explain(model, tok, [t for t, _ in rows])
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
        assert row["words"] == text.split()
        if label:  # the planted word takes the largest share toward the label it decides
            toward = row["attributions"][model.config.id2label[1]]
            assert row["words"][toward.index(max(toward))] == PLANTED, (text, toward)


def test_word_pieces_are_merged_into_words():
    from transformers import AutoTokenizer

    from llmkit import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve("asset:minilm"))
    text = "Unbelievably charming, isn't it?"
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    assert len(enc["input_ids"][0]) > len(text.split()) + 2  # the tokenizer does split it into pieces
    words, values = explain._words(text, enc, torch.ones(enc["input_ids"].shape[1]))
    assert "".join(words) == text.replace(" ", "")  # every character once, words as written
    assert words[:2] == ["Unbelievably", "charming"] and values[0] > 1  # one word from several pieces, summed


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
    with pytest.raises(LlmkitError, match="not a sequence classifier"):
        (tmp_path / "lm").mkdir()
        (tmp_path / "lm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
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
    for text in (page, table):
        assert "neg (mistake) (the run: pos)" in text
        assert text.count("(the run:") == 1  # the row that agrees is not marked
