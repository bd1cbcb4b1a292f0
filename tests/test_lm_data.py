"""Causal-LM data: packing keeps every token once, in order; only response tokens carry labels."""

from __future__ import annotations

import json
import random

import pytest
from helpers import CHATML, LM_SPECIAL, LM_WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmkit.data.lm import IGNORE, chat_example, pack, prompt_response_example
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
    packed = prepare(DataConfig(dataset=str(tmp_path), test_split=None, max_length=8), tok, seed=0,
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
    from llmkit.data.lm import CandidateCollator, prepare, render_prompt

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
    from llmkit.data.lm import fit_prompt

    long_text = " ".join(["good"] * 40)
    ex = fit_prompt(tok, "is this {text}", long_text, "positive", max_length=20)
    assert len(ex["input_ids"]) <= 20
    assert [t for t in ex["labels"] if t != IGNORE][0] == tok.convert_tokens_to_ids("positive")
    with pytest.raises(LlmkitError, match="leaves no room for the text"):
        fit_prompt(tok, "is this {text}", long_text, "positive", max_length=8)


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
