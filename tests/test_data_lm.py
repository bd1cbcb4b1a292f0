"""Causal-LM data: packing keeps every token once, in order; only response tokens carry labels."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from helpers import CHATML, LM_SPECIAL, LM_WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmkit.data.formats import chat_example, prompt_response_example
from llmkit.data.lm import IGNORE
from llmkit.data.packing import pack
from llmkit.errors import LlmkitError


@pytest.fixture(scope="module")
def tok():
    vocab = {w: i for i, w in enumerate(LM_SPECIAL + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(LM_SPECIAL)
    t = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    t.chat_template = CHATML
    return t


def test_packing_keeps_every_token_once_in_order():
    rng = random.Random(0)
    docs = [[rng.randint(3, 99) for _ in range(rng.randint(1, 40))] for _ in range(57)]
    blocks, stats = pack(docs, block_size=16, eos_id=2, pad_id=0)
    stream = [t for d in docs for t in (*d, 2)]  # each document then EOS
    flat = [t for ids, mask in zip(blocks["input_ids"], blocks["attention_mask"]) for t, m in zip(ids, mask) if m]
    assert flat == stream  # nothing lost, duplicated or reordered
    assert all(len(b) == 16 for b in blocks["input_ids"])
    assert all(sum(m) == 16 for m in blocks["attention_mask"][:-1])  # only the last block may be short
    for i, ids in enumerate(blocks["input_ids"]):  # block i starts at stream position 16 i
        assert ids[: sum(blocks["attention_mask"][i])] == stream[16 * i: 16 * (i + 1)]
    last = blocks["labels"][-1]
    real = sum(blocks["attention_mask"][-1])
    assert last[real:] == [IGNORE] * (16 - real)
    assert stats.tokens == len(stream) and stats.blocks == len(blocks["input_ids"]) == -(-len(stream) // 16)
    assert stats.efficiency == pytest.approx(len(stream) / (16 * stats.blocks))
    assert stats.efficiency > 0.99 or len(stream) < 16 * 100  # one short block at most


def test_chat_masking_token_by_token(tok):
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "is this film good"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "this film is bad"},
        {"role": "assistant", "content": "negative"},
    ]
    ex = chat_example(tok, messages)
    ids = tok.convert_ids_to_tokens(ex["input_ids"])
    assert ids == ["<|im_start|>", "system", "you", "are", "helpful", "<|im_end|>",
                   "<|im_start|>", "user", "is", "this", "film", "good", "<|im_end|>",
                   "<|im_start|>", "assistant", "positive", "<|im_end|>",
                   "<|im_start|>", "user", "this", "film", "is", "bad", "<|im_end|>",
                   "<|im_start|>", "assistant", "negative", "<|im_end|>"]
    trained = [ids[i] for i, lab in enumerate(ex["labels"]) if lab != IGNORE]
    assert trained == ["positive", "<|im_end|>", "negative", "<|im_end|>"]
    for i, lab in enumerate(ex["labels"]):
        assert lab == IGNORE or lab == ex["input_ids"][i]  # labels are the tokens themselves (shifted in the model)


def test_prompt_response_with_and_without_template(tok):
    ex = prompt_response_example(tok, "is this film good", "positive")
    assert [t for t, lab in zip(tok.convert_ids_to_tokens(ex["input_ids"]), ex["labels"]) if lab != IGNORE] == \
        ["positive", "<|im_end|>"]
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                    eos_token="<|im_end|>")
    plain.chat_template = None
    ex = prompt_response_example(plain, "is this film good", "negative")
    assert plain.convert_ids_to_tokens(ex["input_ids"]) == ["is", "this", "film", "good", "negative", "<|im_end|>"]
    assert ex["labels"][:4] == [IGNORE] * 4 and ex["labels"][4:] == ex["input_ids"][4:]


def test_the_fast_tokenizer_path_gives_the_plain_calls_ids():
    """packing.ids_of (the backend's encode_batch_fast) and the batched chat render give the ids of transformers'
    own calls on the real SmolLM2 tokenizer (BPE, added tokens, a chat template); a tokenizer set to truncate is
    asked through the plain call."""
    from transformers import AutoTokenizer

    from llmkit.assets import resolve
    from llmkit.data.formats import chat_examples
    from llmkit.data.packing import ids_of

    real = AutoTokenizer.from_pretrained(resolve("asset:smollm2"))
    texts = ["A film, I said: <|im_end|> not good.", "  caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9 ", "", "x" * 300,
             "tabs\tand\nnewlines  twice"]
    plain = real(texts, add_special_tokens=False)["input_ids"]
    assert ids_of(real, texts) == plain
    conversations = [[{"role": "user", "content": t or "hi"}, {"role": "assistant", "content": "positive"},
                      {"role": "user", "content": "and now?"}, {"role": "assistant", "content": t[::-1] or "no"}]
                     for t in texts]
    for conv, ex in zip(conversations, chat_examples(real, conversations)):
        assert ex["input_ids"] == list(real.apply_chat_template(conv, tokenize=True, return_dict=False))
        assert sum(lab != IGNORE for lab in ex["labels"]) > 2
    real.backend_tokenizer.enable_truncation(3)  # as an earlier caller might leave it: the plain call ignores it
    assert ids_of(real, texts) == plain


def test_bad_messages_are_clear_errors(tok):
    with pytest.raises(LlmkitError, match="message 1 must be a mapping with role"):
        chat_example(tok, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "hi"}])
    with pytest.raises(LlmkitError, match="block size must be >= 2"):
        pack([[1, 2]], block_size=1, eos_id=2, pad_id=0)


def test_prepare_packs_text_and_renders_prompt_response(tok, tmp_path):
    import json

    from llmkit.config import DataConfig
    from llmkit.data.lm import LMCollator, prepare

    text = ["this film is good", "hi", "you are helpful and this is bad"] * 5
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": t, "prompt": t, "response": "positive"}) + "\n" for t in text))
    packed = prepare(DataConfig(dataset=str(tmp_path), test_split=None, max_length=8, format="text"), tok, seed=0,
                     log=lambda _: None)
    assert packed.mode == "packed" and packed.packing.tokens == sum(len(t.split()) + 1 for t in text)
    assert all(len(ids) == 8 for ids in packed.train["input_ids"])
    rows = prepare(DataConfig(dataset=str(tmp_path), test_split=None, prompt_column="prompt",
                              response_column="response"), tok, seed=0, log=lambda _: None)
    assert rows.mode == "prompt_response" and len(rows.train) == len(text)
    batch = LMCollator(pad_id=tok.pad_token_id)([rows.train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    kept = batch["labels"][batch["labels"] != IGNORE]
    assert tok.convert_ids_to_tokens(kept.tolist()) == ["positive", "<|im_end|>"] * 4
    with pytest.raises(LlmkitError, match="must be set together"):
        prepare(DataConfig(dataset=str(tmp_path), test_split=None, prompt_column="prompt"), tok, seed=0)


def _label_cfg(tmp_path, **extra):
    from llmkit.config import DataConfig

    rows = [{"text": "this film is good", "label": "positive"}, {"text": "this film is bad", "label": "negative"},
            {"text": "is this good", "label": "positive"}, {"text": "hi", "label": "negative"}]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(dataset=str(tmp_path), test_split=None, label_names=["negative", "positive"],
                      prompt_template="is this {text}", max_length=32, **extra)


def test_label_words_rows_train_on_the_word_and_score_every_word(tok, tmp_path):
    from llmkit.data.label_prompts import render_prompt
    from llmkit.data.lm import CandidateCollator, prepare

    assert render_prompt("a {text} {other} {text_pair}", "b", "c") == "a b {other} c"  # no str.format
    ds = prepare(_label_cfg(tmp_path), tok, seed=0)
    assert ds.mode == "labels" and ds.label_words == ["negative", "positive"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in ds.train:
        text = tok.decode(row["input_ids"])
        target = [t for t in row["labels"] if t != IGNORE]
        word = "positive" if " good" in text else "negative"
        assert target == [tok.convert_tokens_to_ids(word), im_end]  # the word and its turn end, nothing else
    # scored in length order (little padding); "row" is the index into the split
    lengths = [max(map(len, r["candidates"])) for r in ds.validation]
    assert lengths == sorted(lengths) and sorted(r["row"] for r in ds.validation) == list(range(len(ds.validation)))
    by_row = {r["row"]: r for r in ds.validation}
    row = by_row[0]
    assert row["labels"] == 1  # validation row 0 is "positive"
    neg, pos = row["candidates"]
    n = len(neg) - 2
    assert neg[:n] == pos[:n] and neg[n:] != pos[n:]  # same prompt, different word
    for cand, target, word in zip(row["candidates"], row["targets"], ("negative", "positive")):
        masked = [(i, t) for i, t in enumerate(target) if t != IGNORE]
        assert [t for _, t in masked] == [tok.convert_tokens_to_ids(word), im_end]
        assert all(cand[i] == t for i, t in masked)
    batch = CandidateCollator(tok.pad_token_id)([by_row[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].tolist() == [1, 0, 1]
    assert batch["row"].tolist() == [0, 1, 2]
    assert (batch["targets"] != IGNORE).sum().item() == 12


def test_label_words_cut_the_text_never_the_word(tok, tmp_path):
    from llmkit.data.label_prompts import fit_prompt

    long_text = " ".join(["good"] * 40)
    ex = fit_prompt(tok, "is this {text}", long_text, "positive", max_length=20)
    assert len(ex["input_ids"]) <= 20
    assert [t for t in ex["labels"] if t != IGNORE][0] == tok.convert_tokens_to_ids("positive")
    with pytest.raises(LlmkitError, match="leaves no room for the text"):
        fit_prompt(tok, "is this {text}", long_text, "positive", max_length=8)


def test_label_words_of_different_lengths_are_scored_after_one_prompt(tok, tmp_path):
    """The run's evaluation and every command render a label-word prompt through one function: a long text is cut
    once, so that it fits after the longest word, and every word is scored after the same prompt tokens (cutting
    per word gave the 1-token word a longer prompt than the 4-token one)."""
    from types import SimpleNamespace

    from llmkit.data.label_prompts import fit_text, label_candidates

    words = ["bad", "this film is good"]
    cfg = SimpleNamespace(prompt_template="is this {text}", max_length=24)
    long_text = " ".join(["good"] * 40)
    got = label_candidates(tok, cfg, words, long_text)
    prompts = []
    for cand, target in zip(got["candidates"], got["targets"]):
        first = next(i for i, t in enumerate(target) if t != IGNORE)
        prompts.append(cand[:first])
        assert len(cand) <= 24
    assert prompts[0] == prompts[1]
    # the commands' scorer (evals.attribution.LabelWords) renders through the same function
    assert [e["input_ids"] for e in fit_text(tok, cfg.prompt_template, long_text, words, 24)[1]] == got["candidates"]


def test_label_words_errors(tok, tmp_path):
    from llmkit.data.lm import prepare

    with pytest.raises(LlmkitError, match="data.label_words has 3 words but the data has 2 labels"):
        prepare(_label_cfg(tmp_path, label_words=["bad", "good", "hi"]), tok, seed=0)
    # both unknown to the word-level tokenizer: the same <unk> sequence
    with pytest.raises(LlmkitError, match="tokenize to identical sequences"):
        prepare(_label_cfg(tmp_path, label_words=["awful", "great"]), tok, seed=0)


def test_byte_level_bpe_tokenizer_trained_from_the_data(tmp_path):
    from llmkit.config import DataConfig
    from llmkit.data.lm import training_texts
    from llmkit.model import train_tokenizer

    lines = [f"the film number {i} was {'good' if i % 2 else 'bad'} and long" for i in range(200)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    cfg = DataConfig(dataset=str(tmp_path), test_split=None)
    texts = list(training_texts(cfg))
    assert texts == lines
    tok = train_tokenizer(iter(texts), 300, tmp_path / "tok")
    assert len(tok) <= 300 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    for text in ("the film number 7 was good", "unseen wörds ☃ too"):  # byte-level: anything round-trips
        assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert len(reloaded("the film number")["input_ids"]) < len("the film number")  # merges were learned
    with pytest.raises(LlmkitError, match="vocab_size 100 is too small for a byte-level BPE"):
        train_tokenizer(iter(texts), 100, tmp_path / "tok2")


@pytest.mark.parametrize("per_batch", [1, 3])
def test_packed_blocks_cut_across_map_batches_keep_the_stream(monkeypatch, per_batch):
    """Blocks are cut by a batched map: a document spanning two map batches is split exactly as in one pass."""
    from llmkit.data import packing

    monkeypatch.setattr(packing, "BLOCKS_PER_BATCH", per_batch)
    rng = random.Random(1)
    docs = [[rng.randint(3, 99) for _ in range(rng.randint(1, 30))] for _ in range(23)]
    blocks, stats = pack(docs, block_size=7, eos_id=2, pad_id=0)
    stream = [t for d in docs for t in (*d, 2)]
    assert [t for ids, m in zip(blocks["input_ids"], blocks["attention_mask"]) for t, k in zip(ids, m) if k] == stream
    assert stats.blocks == len(blocks["input_ids"]) == -(-len(stream) // 7)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


FORMAT_ROWS = {
    "alpaca": [{"instruction": "is this film good", "input": "hi", "output": "positive"},
               {"instruction": "is this bad", "input": "", "output": "negative"}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "you are helpful"},
                                    {"from": "human", "value": "is this good"}, {"from": "gpt", "value": "positive"}]},
                 {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi"}]}],
    "messages": [{"messages": [{"role": "user", "content": "is this good"},
                               {"role": "assistant", "content": "positive"}]},
                 {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}],
    "prompt_response": [{"prompt": "is this good", "response": "positive"}, {"prompt": "hi", "response": "hi"}],
    "text": [{"text": "this film is good"}, {"text": "hi you"}],
}
TRAINED = {"alpaca": [["positive", "<|im_end|>"], ["negative", "<|im_end|>"]],
           "sharegpt": [["positive", "<|im_end|>"], ["hi", "<|im_end|>"]],
           "messages": [["positive", "<|im_end|>"], ["hi", "<|im_end|>"]],
           "prompt_response": [["positive", "<|im_end|>"], ["hi", "<|im_end|>"]]}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_is_detected_and_trains_on_responses_only(tok, tmp_path, fmt):
    from llmkit.config import DataConfig
    from llmkit.data.lm import prepare

    for split in ("train", "validation"):
        _write(tmp_path / f"{split}.jsonl", FORMAT_ROWS[fmt])
    said = []
    for chosen in ("auto", fmt):
        data = prepare(DataConfig(dataset=str(tmp_path), test_split=None, max_length=32, format=chosen), tok,
                       seed=0, log=said.append)
        assert data.format == fmt
        if fmt == "text":
            assert data.mode == "packed" and data.packing.tokens == 8  # 4 + 2 words, an EOS each
            continue
        assert data.mode == ("chat" if fmt in ("sharegpt", "messages") else "prompt_response")
        by_file_row = {tuple(r["input_ids"]): r for r in data.train}  # the train split is shuffled
        assert len(by_file_row) == 2 and list(data.train_lengths) == [len(r["input_ids"]) for r in data.train]
        trained = sorted([tok.convert_ids_to_tokens([t for t in r["labels"] if t != IGNORE]) for r in data.train])
        assert trained == sorted(TRAINED[fmt])
    assert any(f"data: format {fmt} (detected from the column" in line for line in said)
    if fmt == "alpaca":  # the input follows the instruction in the prompt
        prompts = [tok.decode(r["input_ids"]) for r in data.train]
        assert any("is this film good" in p and "hi" in p for p in prompts)
    if fmt == "sharegpt":  # the system turn is rendered, as system, and not trained on
        row = next(r for r in data.train if "system" in tok.convert_ids_to_tokens(r["input_ids"]))
        assert tok.convert_ids_to_tokens(row["input_ids"])[:5] == ["<|im_start|>", "system", "you", "are", "helpful"]


@pytest.mark.parametrize(("fmt", "bad", "message"), [
    ("alpaca", {"instruction": "hi", "output": None}, "row 1 (alpaca): alpaca 'output' must be a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hi"}]},
     "row 1 (sharegpt): ShareGPT turn 1 is from 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}]}, "row 1 (sharegpt): the conversation has no gpt"),
    ("prompt_response", {"prompt": "hi", "response": 3}, "row 1 (prompt_response): the response must be a string"),
])
def test_a_row_that_does_not_fit_its_format_is_named(tok, tmp_path, fmt, bad, message):
    from llmkit.config import DataConfig
    from llmkit.data.lm import prepare

    _write(tmp_path / "train.jsonl", [FORMAT_ROWS[fmt][0], bad])
    _write(tmp_path / "validation.jsonl", FORMAT_ROWS[fmt][:1])
    with pytest.raises(LlmkitError, match=f"split 'train' {re.escape(message)}"):
        prepare(DataConfig(dataset=str(tmp_path), test_split=None, max_length=32), tok, seed=0, log=lambda _: None)


def test_format_errors_name_the_columns(tok, tmp_path):
    from llmkit.config import DataConfig
    from llmkit.data.lm import prepare

    for split in ("train", "validation"):
        _write(tmp_path / f"{split}.jsonl", [{"question": "hi", "answer": "hi"}])
    with pytest.raises(LlmkitError, match=r"columns \['answer', 'question'\] fit no format"):
        prepare(DataConfig(dataset=str(tmp_path), test_split=None), tok, seed=0, log=lambda _: None)
    with pytest.raises(LlmkitError, match="has no column 'instruction'"):
        prepare(DataConfig(dataset=str(tmp_path), test_split=None, format="alpaca"), tok, seed=0, log=lambda _: None)
    with pytest.raises(LlmkitError, match="data.format is text but data.messages_column is set"):
        prepare(DataConfig(dataset=str(tmp_path), test_split=None, format="text", messages_column="m"), tok, seed=0)


def test_packed_data_is_cached_and_reused_by_a_second_run(tok, tmp_path, monkeypatch):
    """The packed blocks live in an Arrow file beside the tokenized data; a second prepare reads that file instead
    of packing again (as the other ranks, and the next run, do)."""
    from llmkit.config import DataConfig
    from llmkit.data import lm, packing

    text = ["this film is good", "hi", "you are helpful and this is bad"] * 20
    for split in ("train", "validation"):
        _write(tmp_path / f"{split}.jsonl", [{"text": t} for t in text])
    cfg = DataConfig(dataset=str(tmp_path), test_split=None, max_length=8)
    first = lm.prepare(cfg, tok, seed=0, log=lambda _: None)
    files = [f["filename"] for f in first.train.cache_files]
    assert files and all("llmkit-packed-" in f for f in files)
    stamp = {f: Path(f).stat().st_mtime_ns for f in files}
    calls = []
    monkeypatch.setattr(packing, "_stream", lambda *a: calls.append(a) or pytest.fail("packed again"))
    second = lm.prepare(cfg, tok, seed=0, log=lambda _: None)
    assert [f["filename"] for f in second.train.cache_files] == files and not calls
    assert {f: Path(f).stat().st_mtime_ns for f in files} == stamp
    assert second.train["input_ids"] == first.train["input_ids"]
    cfg = dataclasses.replace(cfg, max_length=6)  # another block size: packed anew, into another file
    monkeypatch.undo()
    third = lm.prepare(cfg, tok, seed=0, log=lambda _: None)
    assert third.train.cache_files[0]["filename"] not in files and len(third.train[0]["input_ids"]) == 6


def test_a_two_source_mixture_draws_each_source_by_its_weight(tok, tmp_path):
    """Weights are shares of the training examples: 3:1 over two SFT sources of 400 rows each, in two formats;
    the drawn shares match within sampling error, the counts are reported, and a bad source is named."""
    import numpy as np

    from llmkit.config import DataConfig, MixtureSource
    from llmkit.data.lm import prepare

    for name, fmt in (("a", "alpaca"), ("b", "sharegpt")):
        (tmp_path / name).mkdir()
        rows = [FORMAT_ROWS[fmt][i % 2] for i in range(400)]
        _write(tmp_path / name / "train.jsonl", rows)
        if name == "a":
            _write(tmp_path / name / "validation.jsonl", rows[:5])
    cfg = DataConfig(mixture=[MixtureSource(weight=3, dataset=str(tmp_path / "a")),
                              MixtureSource(weight=1, dataset=str(tmp_path / "b"))], test_split=None, max_length=32)
    said = []
    data = prepare(cfg, tok, seed=0, log=said.append)
    a, b = data.sources
    n = a["examples"] + b["examples"]
    assert a["examples"] == 400 or b["examples"] == 400  # it ends when a source runs out
    assert len(data.train) == n and abs(a["drawn_share"] - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5
    assert np.bincount(data.train["source"]).tolist() == [a["examples"], b["examples"]]
    assert a["tokens"] == sum(r["length"] for r in data.train if r["source"] == 0) > 0
    assert len(data.validation) == 5 and data.mode == "mixed"  # prompt/response rows and chat rows
    assert any("mixture source" in line and "weight 3 (75.0%)" in line for line in said)
    again = prepare(cfg, tok, seed=0, log=lambda _: None)
    assert again.train["source"] == data.train["source"]  # the seed fixes the draw
    assert prepare(cfg, tok, seed=1, log=lambda _: None).train["source"] != data.train["source"]
    from llmkit.data.lm import training_texts

    texts = set(training_texts(cfg))  # what a from-scratch tokenizer is trained on: both sources
    assert {"is this film good", "is this good", "positive"} <= texts
    cfg.mixture[1] = dataclasses.replace(cfg.mixture[1], format="alpaca")
    with pytest.raises(LlmkitError, match=r"data.mixture\[1\] \(.*/b\): split 'train' has no column 'instruction'"):
        prepare(cfg, tok, seed=0, log=lambda _: None)


def test_the_model_card_lists_the_mixture_sources(tmp_path):
    import yaml

    from llmkit.rundir.layout import RunDir
    from llmkit.ship import card

    mix = [{"source": "org/sft-a", "weight": 3.0, "weight_share": 0.75, "examples": 533, "drawn_share": 0.7507,
            "tokens": 9000, "available": 533},
           {"source": "/data/b", "weight": 1.0, "weight_share": 0.25, "examples": 177, "drawn_share": 0.2493,
            "tokens": 3000, "available": 400}]
    (tmp_path / "training_config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "org/base"}, "data": {"mixture": [{"dataset": "org/sft-a", "weight": 3},
                                                                    {"dataset": "/data/b", "weight": 1}]}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"validation": {"loss": 1.0}, "data_mixture": mix}))
    text = card.build(RunDir(tmp_path), tmp_path, "causal_lm", "me/model")
    assert "on a mixture of 2 sources" in text
    assert "| org/sft-a | 3 (75.0%) | 533 of 533 (75.1%) | 9000 |" in text
    assert "| /data/b | 1 (25.0%) | 177 of 400 (24.9%) | 3000 |" in text
    assert "- org/sft-a" in text.split("---")[1]  # the Hub source in the card's metadata, the local one not
    assert "/data/b" not in text.split("---")[1]


@pytest.mark.parametrize("files", [1, 2])
def test_a_streamed_split_gives_each_rank_its_share_and_resumes_at_the_exact_row(tok, tmp_path, files):
    """Two ranks' StreamLoaders over a streamed split in one file (each rank keeps every other row) or in two
    shards named as on the Hub (each rank reads its own): disjoint shares that cover it, pass after pass; a loader restored from the
    state saved after batch 3 yields what the uninterrupted one yields next."""
    from llmkit.config import DataConfig
    from llmkit.data.lm import LMCollator, prepare
    from llmkit.data.streaming import StreamLoader

    words = LM_WORDS[5:]
    rows = [{"prompt": " ".join(random.Random(i).choices(words, k=1 + i % 5)), "response": words[i % len(words)]}
            for i in range(22)]
    if files == 1:
        _write(tmp_path / "train.jsonl", rows)
    else:
        _write(tmp_path / "train-00000-of-00002.jsonl", rows[:11])
        _write(tmp_path / "train-00001-of-00002.jsonl", rows[11:])
    _write(tmp_path / "validation.jsonl", rows[:3])
    data = prepare(DataConfig(dataset=str(tmp_path), test_split=None, streaming=True), tok, seed=0,
                   log=lambda _: None)
    assert data.streamed and len(data.validation) == 3 and data.format == "prompt_response"
    assert data.train.rows.n_shards == files
    collate = LMCollator(tok.pad_token_id)

    def take(loader, n):
        it = iter(loader)
        return [next(it)["input_ids"].tolist() for _ in range(n)]

    shares = [take(StreamLoader(data.train, 2, collate, rank, 2), 7) for rank in (0, 1)]  # 11 rows: 6 batches
    seen = [tuple(x for x in r if x != tok.pad_token_id) for share in shares for b in share[:6] for r in b]
    assert len(set(seen)) == len(seen) == 22  # disjoint shares that cover the stream
    assert all(share[6] == share[0] for share in shares)  # then the next pass starts over
    straight = StreamLoader(data.train, 2, collate, 0, 2)
    it = iter(straight)
    for _ in range(3):
        next(it)
    saved = json.loads(json.dumps(straight.state_dict()))  # what a checkpoint holds
    rest = [next(it)["input_ids"].tolist() for _ in range(7)]  # into the next pass
    resumed = StreamLoader(data.train, 2, collate, 0, 2)
    resumed.load_state_dict(saved)
    assert take(resumed, 7) == rest


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_see_each_other(tok, tiny_lm, attn):
    """data.packing: a flattened batch's per-token losses equal each row's losses computed alone, so no row
    attends to another and no label crosses a row boundary."""
    from transformers import AutoModelForCausalLM

    from llmkit.data.formats import prompt_response_example
    from llmkit.data.lm import ROWS_KEY, FlatCollator

    net = AutoModelForCausalLM.from_pretrained(tiny_lm / "model", attn_implementation=attn).eval()
    rows = [prompt_response_example(tok, p, r) for p, r in (("is this film good", "positive"), ("hi", "hi"),
                                                            ("you are helpful and this is bad", "negative bad"))]
    batch = FlatCollator(flash=False)(rows)
    assert batch[ROWS_KEY] == 3 and "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))

    def token_losses(ids, labels, **extra):
        logits = net(input_ids=ids, **extra).logits[0, :-1].double()
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE, reduction="none")

    with torch.no_grad():
        packed = token_losses(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                              use_cache=batch["use_cache"])
        alone = [token_losses(torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])) for r in rows]
    start = 0
    for r, loss in zip(rows, alone):
        n = len(r["input_ids"])
        assert torch.allclose(packed[start:start + n - 1], loss, atol=1e-6), attn
        if start:  # the first token of each row after the first predicts nothing across the boundary
            assert batch["labels"][0, start] == IGNORE
        start += n
    # without the restarting positions the rows would see each other: the check above can fail
    with torch.no_grad():
        leaky = token_losses(batch["input_ids"], batch["labels"], use_cache=False)
    assert not torch.allclose(leaky, packed, atol=1e-4)


def test_a_mixture_of_packed_text_and_rows(tok, tmp_path):
    """A text source (packed blocks) and an alpaca source (rows) in one mixture: one row layout, real lengths."""
    from llmkit.config import DataConfig, MixtureSource
    from llmkit.data.lm import prepare

    for name, rows in (("text", [{"text": "this film is good and you are helpful"}] * 30),
                       ("alpaca", FORMAT_ROWS["alpaca"] * 15)):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "train.jsonl", rows)
        _write(tmp_path / name / "validation.jsonl", rows[:2])
    cfg = DataConfig(mixture=[MixtureSource(weight=1, dataset=str(tmp_path / "text")),
                              MixtureSource(weight=1, dataset=str(tmp_path / "alpaca"))], test_split=None, max_length=16)
    data = prepare(cfg, tok, seed=0, log=lambda _: None)
    assert data.mode == "mixed" and len(data.validation) == 2 + 2
    blocks = [r for r in data.train if r["source"] == 0]
    assert blocks and all(len(r["input_ids"]) == 16 for r in blocks)
    assert all(r["length"] == sum(r["attention_mask"]) for r in data.train)  # real tokens, the short block too
    assert data.sources[0]["tokens"] == sum(r["length"] for r in blocks)
