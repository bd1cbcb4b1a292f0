"""The data pipeline on tiny data made here: loading, label mapping, errors, cleaning, caching, batching."""

from __future__ import annotations

import collections

import pytest
from helpers import make_sentences, write_jsonl
from transformers import AutoTokenizer

from llmkit.config import DataConfig
from llmkit.data import classification, loaders, sources
from llmkit.errors import LlmkitError


@pytest.fixture()
def tok(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def _files(tmp_path, train, validation, test=None, ext="jsonl"):
    files = {}
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        if rows is None:
            continue
        path = tmp_path / f"{split}.{ext}"
        if ext == "csv":
            import csv

            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            write_jsonl(path, rows)
        files[split] = str(path)
    return files


def test_string_labels_are_mapped_in_sorted_order(tmp_path, tok):
    files = _files(tmp_path, make_sentences(20, 1), make_sentences(7, 2))
    out = classification.prepare(DataConfig(data_files=files, test_split=None), tok, seed=0, log=lambda _: None)
    assert out.label_names == ["neg", "pos"]
    raw = [r["label"] for r in make_sentences(7, 2)]
    # eval is length-sorted; "row" maps back to the original order
    by_row = {r: lab for r, lab in zip(out.validation["row"], out.validation["labels"])}
    assert [out.label_names[by_row[i]] for i in range(7)] == raw
    assert set(out.train.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert out.test is None


def test_label_names_fix_the_order_and_csv_works(tmp_path, tok):
    files = _files(tmp_path, make_sentences(20, 1), make_sentences(7, 2), make_sentences(5, 3), ext="csv")
    cfg = DataConfig(data_files=files, label_names=["pos", "neg"])
    out = classification.prepare(cfg, tok, seed=0, log=lambda _: None)
    assert out.label_names == ["pos", "neg"]
    first = make_sentences(20, 1)
    texts = {r["text"]: r["label"] for r in first}
    decoded = [tok.decode(ids, skip_special_tokens=True) for ids in out.train["input_ids"]]
    for text, label in zip(decoded, out.train["labels"]):
        assert ["pos", "neg"][label] == texts[text]
    assert len(out.test) == 5


def test_missing_column_is_a_clear_error(tmp_path, tok):
    files = _files(tmp_path, make_sentences(10, 1), make_sentences(4, 2))
    with pytest.raises(LlmkitError) as err:
        classification.prepare(DataConfig(data_files=files, test_split=None, text_column="sentence"), tok, seed=0)
    assert "split 'train' has no column 'sentence' (columns: ['text', 'label'])" in str(err.value)


def test_missing_split_and_unseen_eval_label(tmp_path, tok):
    files = _files(tmp_path, make_sentences(10, 1), make_sentences(4, 2))
    with pytest.raises(LlmkitError, match=r"data.test_split names split 'test', but the dataset only has"):
        classification.prepare(DataConfig(dataset=str(tmp_path)), tok, seed=0)
    bad = make_sentences(4, 2)
    bad[3]["label"] = "meh"
    files = _files(tmp_path, make_sentences(10, 1), bad)
    with pytest.raises(LlmkitError, match=r"split 'validation' row 3: label 'meh' is not one of \['neg', 'pos'\]"):
        classification.prepare(DataConfig(data_files=files, test_split=None), tok, seed=0)


def test_int_label_out_of_range(tmp_path, tok):
    train = make_sentences(10, 1, string_labels=False)
    val = make_sentences(4, 2, string_labels=False)
    val[1]["label"] = 5
    files = _files(tmp_path, train, val)
    with pytest.raises(LlmkitError, match=r"split 'validation' row 1: label 5 is out of range for 2 classes"):
        classification.prepare(DataConfig(data_files=files, test_split=None), tok, seed=0)


def test_empty_rows_are_dropped_with_a_count(tmp_path, tok):
    train = make_sentences(10, 1) + [{"text": "  ", "label": "pos"}, {"text": None, "label": "neg"}]
    files = _files(tmp_path, train, make_sentences(4, 2))
    logs = []
    out = classification.prepare(DataConfig(data_files=files, test_split=None), tok, seed=0, log=logs.append)
    assert len(out.train) == 10
    assert any("dropped 2 rows of split 'train'" in line for line in logs)
    # or, by config, the first bad row is an error that names it
    with pytest.raises(LlmkitError, match="split 'train' row 10 has empty/missing text or no label: .*set "
                                          "data.drop_bad_rows: true"):
        classification.prepare(DataConfig(data_files=files, test_split=None, drop_bad_rows=False), tok, seed=0)
    empty = _files(tmp_path, [{"text": "", "label": "pos"}], make_sentences(4, 2))
    with pytest.raises(LlmkitError, match="split 'train' has no usable rows"):
        classification.prepare(DataConfig(data_files=empty, test_split=None), tok, seed=0)


def test_exclude_rows_leaves_out_rows_by_their_id_in_every_form(tmp_path, tok):
    """data.exclude_rows names rows by their place in the train split as read (bad rows dropped later do not shift
    the ids), as a list, a .txt of ids or an audit's suspects.jsonl; the validation split is never touched."""
    train = make_sentences(10, 1)
    train.insert(3, {"text": "  ", "label": "pos"})  # row 3 is dropped as empty: row 4 keeps its id
    files = _files(tmp_path, train, make_sentences(4, 2))
    (tmp_path / "ids.txt").write_text("# reviewed\n0\n4  # wrong label\n\n7\n")
    write_jsonl(tmp_path / "suspects.jsonl", [{"row": 0, "text": "x"}, {"row": 4}, {"row": 7}])
    for setting in ([0, 4, 7], str(tmp_path / "ids.txt"), str(tmp_path / "suspects.jsonl")):
        logs = []
        out = classification.prepare(DataConfig(data_files=files, test_split=None, exclude_rows=setting), tok,
                                     seed=0, log=logs.append)
        ids = sorted(out.train[sources.ROW_ID_KEY])
        assert ids == [1, 2, 5, 6, 8, 9, 10], setting
        assert len(out.validation) == 4
        assert any("excluded 3 rows of split 'train' listed in data.exclude_rows" in line for line in logs)
    for setting, message in (([0, 11], "lists row 11, but split 'train' has 11 rows"),
                             ([-1], r"data.exclude_rows\[0\]: -1 is not a row id"),
                             (str(tmp_path / "none.txt"), "is not a file"),
                             (str(tmp_path / "train.jsonl"), "line 1 is not a JSON object with a \"row\" id")):
        with pytest.raises(LlmkitError, match=message):
            classification.prepare(DataConfig(data_files=files, test_split=None, exclude_rows=setting), tok, seed=0)


def test_cleaning():
    assert sources.clean("Great&nbsp;<b>film</b>  see https://x.y/z ！") == "Great film see !"


def test_tokenization_is_cached(tmp_path, tok):
    files = _files(tmp_path, make_sentences(30, 1), make_sentences(6, 2))
    cfg = DataConfig(data_files=files, test_split=None)
    first = classification.prepare(cfg, tok, seed=0, log=lambda _: None)
    second = classification.prepare(cfg, tok, seed=0, log=lambda _: None)
    assert first.train.cache_files and first.train["input_ids"] == second.train["input_ids"]
    assert second.train.cache_files[0]["filename"] == first.train.cache_files[0]["filename"]


def test_max_length_truncates(tmp_path, tok):
    files = _files(tmp_path, make_sentences(30, 1), make_sentences(6, 2))
    out = classification.prepare(DataConfig(data_files=files, test_split=None, max_length=6), tok, seed=0, log=lambda _: None)
    assert max(out.train_lengths) == 6


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_length_grouped_batches(replicas):
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(203)]
    sampler = loaders.LengthGroupedBatchSampler(lengths, batch_size=8, per_step=replicas, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 26
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))  # every row exactly once
    assert all(len(b) == 8 for b in batches[:-1])
    # padding efficiency: real tokens / padded tokens
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert real / padded > 0.9
    # the ranks of one step get batches of about the same length
    full_groups = (len(batches) - 1) // replicas
    for g in range(full_groups):
        group = batches[g * replicas:(g + 1) * replicas]
        maxes = [max(lengths[i] for i in b) for b in group]
        assert max(maxes) - min(maxes) <= 8  # unrelated batches would differ by up to ~55
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches  # and reproducible


def test_group_order_is_shuffled():
    lengths = list(range(100))
    batches = list(loaders.LengthGroupedBatchSampler(lengths, batch_size=10, per_step=1, seed=0))
    starts = [b[0] for b in batches]
    assert starts != sorted(starts)
    assert collections.Counter(len(b) for b in batches) == {10: 10}
