"""Training dynamics and the data map (issue 49), in-process: the statistics by hand (Dataset Cartography, area under
the margin), the growing .npy file, the recorder on 2 simulated ranks with Accelerate's padding repeats and a
resume from a checkpoint's copy, row ids through shuffling and batching, and the report's section from a run folder
written here. The real 2-rank and resumed runs are asserted in test_report.py and test_train_checkpoint.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from helpers import make_sentences, write_jsonl
from transformers import AutoTokenizer, DataCollatorWithPadding

from llmkit.config import DataConfig
from llmkit.data import classification, sources
from llmkit.data.loaders import LengthGroupedBatchSampler
from llmkit.evals import datamap
from llmkit.report import pages
from llmkit.rundir import dynamics as stored
from llmkit.rundir import layout
from llmkit.rundir.layout import RunDir
from llmkit.train import dynamics


def _records(rows: list[tuple]) -> np.ndarray:
    """(row, epoch, label, predicted, gold_prob, margin) tuples as dynamics records (step = epoch + 1)."""
    out = np.zeros(len(rows), stored.RECORD)
    for i, (row, epoch, label, predicted, prob, margin) in enumerate(rows):
        out[i] = (row, epoch, epoch + 1, label, predicted, prob, margin)
    return out


HAND = _records([
    (0, 0, 0, 0, 0.9, 2.0), (0, 1, 0, 0, 0.8, 1.0), (0, 2, 0, 0, 0.7, 0.5),  # learnt at once
    (1, 0, 1, 0, 0.2, -1.0), (1, 1, 1, 1, 0.6, 0.5), (1, 2, 1, 0, 0.1, -2.0),  # flips: a suspect
    (2, 0, 0, 0, 0.5, 0.1),  # one epoch only
    (3, 1, 1, 1, 0.5, 0.3), (3, 0, 1, 0, 0.3, -0.2),  # out of order; a 1-1 tie of predictions
])


def test_cartography_and_area_under_the_margin_by_hand():
    s = datamap.statistics(HAND, num_labels=2)
    assert s.row.tolist() == [0, 1, 2, 3] and s.epochs.tolist() == [3, 3, 1, 2] and s.label.tolist() == [0, 1, 0, 1]
    assert s.confidence == pytest.approx([0.8, 0.3, 0.5, 0.4])
    # the population standard deviation of the given label's probability (Swayamdipta et al.)
    assert s.variability[:2] == pytest.approx([math.sqrt(0.02 / 3), math.sqrt(0.14 / 3)])
    assert math.isnan(s.variability[2]) and s.variability[3] == pytest.approx(0.1)
    assert s.correctness == pytest.approx([1.0, 1 / 3, 1.0, 0.5])
    assert s.aum == pytest.approx([3.5 / 3, -2.5 / 3, 0.1, 0.05])  # the mean margin (Pleiss et al.)
    assert s.preferred.tolist() == [0, 0, 0, 1]  # most often predicted; the tie goes to the later epoch
    region, cut = datamap.regions(s)
    # measured variabilities 0.0816, 0.2160, 0.1: the top third from their 2/3 quantile
    assert cut == pytest.approx(0.1 + (math.sqrt(0.14 / 3) - 0.1) / 3)
    assert [datamap.REGIONS[i] for i in region] == ["easy-to-learn", "ambiguous", "easy-to-learn", "hard-to-learn"]
    assert datamap.suspects(s).tolist() == [1, 3, 2, 0]  # lowest AUM first
    calm = HAND.copy()  # probabilities that barely move: none is ambiguous, whatever the share
    calm["gold_prob"] = 0.5 + (calm["gold_prob"] - 0.5) / 10
    region, cut = datamap.regions(datamap.statistics(calm, 2))
    assert cut == datamap.AMBIGUOUS_FLOOR and 1 not in region
    one = datamap.statistics(HAND[HAND["epoch"] == 0], 2)
    assert np.isnan(one.variability).all() and datamap.regions(one)[1] is None  # one epoch: not measured


def test_the_file_is_a_numpy_array_that_grows_and_survives_a_torn_append(tmp_path):
    path = tmp_path / layout.DYNAMICS
    stored.append(path, HAND[:4])
    stored.append(path, HAND[4:])
    assert np.array_equal(np.load(path), HAND) and np.array_equal(stored.read(path), HAND)
    assert path.stat().st_size == 256 + 32 * len(HAND)  # NumPy's header, then 32 bytes a record
    with open(path, "ab") as fh:  # records written but not committed: the header still says 9
        fh.write(HAND[:2].tobytes())
    assert np.array_equal(stored.read(path), HAND)
    stored.append(path, HAND[:1])  # the uncommitted tail goes
    assert np.array_equal(np.load(path), np.concatenate([HAND, HAND[:1]]))
    stored.copy(path, tmp_path / "copy.npy")
    assert np.array_equal(np.load(tmp_path / "copy.npy"), np.load(path))


def _fake_run(root: Path, rank: int, world: int):
    acc = SimpleNamespace(is_main_process=rank == 0, num_processes=world, device=torch.device("cpu"))
    return SimpleNamespace(accelerator=acc, dir=RunDir(root), log=lambda _: None, run_dir=root)


ROWS, BATCH, WORLD, STEPS = 90, 8, 2, 6  # 12 batches of 8 (the last 2 short): 96 slots, 6 rows repeated


def _logits(ids: torch.Tensor, epoch: int) -> torch.Tensor:
    return torch.stack([torch.sin(ids * 0.7 + epoch), torch.cos(ids * 1.3 - epoch)], 1)


def _epoch_batches(epoch: int) -> list[list[list[int]]]:
    """Each rank's batches of `epoch`, as Accelerate deals them (even batches: the short ones filled by repeats)."""
    sampler = LengthGroupedBatchSampler([(i * 7) % 13 + 2 for i in range(ROWS)], BATCH, WORLD, seed=0)
    sampler.set_epoch(epoch)
    return [list(BatchSamplerShard(sampler, WORLD, r, split_batches=False, even_batches=True)) for r in range(WORLD)]


def _train(root: Path, steps: range, resumed_from: Path | None = None, checkpoint_at: int | None = None):
    """Steps of a 2-rank run over 2 epochs of STEPS steps, each rank with its recorder; flushes as the loop does
    (at each epoch's end and at the checkpoint) with the two ranks' rows in rank order, as Accelerate's gather."""
    root.mkdir(parents=True, exist_ok=True)
    ranks = [dynamics.Recorder(_fake_run(root, r, WORLD), dynamics.classifier_scores, "test") for r in range(WORLD)]
    state = SimpleNamespace(epoch=(steps[0] - 1) // STEPS, step=steps[0] - 1)
    for recorder in ranks:
        recorder.start(state, resumed_from, stream=False)
    labels = torch.arange(ROWS) % 2
    for step in steps:
        state.epoch = (step - 1) // STEPS
        for rank, recorder in enumerate(ranks):
            ids = torch.tensor(_epoch_batches(state.epoch)[rank][(step - 1) % STEPS])
            out = SimpleNamespace(logits=_logits(ids, state.epoch))
            recorder.batch(step, out, {"labels": labels[ids], sources.ROW_ID_KEY: ids})
        if step % STEPS == 0 or step == checkpoint_at:
            ranks[0].write(torch.cat([r.local() for r in ranks]).numpy())
        if step == checkpoint_at:
            folder = root / "step"
            folder.mkdir()
            ranks[0].into_checkpoint(folder)
    return stored.read(root / layout.DYNAMICS)


def test_two_ranks_record_every_row_once_per_epoch_and_a_resume_continues_exactly(tmp_path):
    straight = _train(tmp_path / "a", range(1, 2 * STEPS + 1), checkpoint_at=4)
    assert len(straight) == 2 * ROWS
    for epoch in (0, 1):
        these = straight[straight["epoch"] == epoch]
        assert sorted(these["row"].tolist()) == list(range(ROWS))  # none lost, none twice
        first = {}  # the step each row is first trained at in this epoch: the record kept
        for step in range(STEPS):
            for rank in range(WORLD):
                for row in _epoch_batches(epoch)[rank][step]:
                    first.setdefault(row, epoch * STEPS + step + 1)
        assert {int(r["row"]): int(r["step"]) for r in these} == first
    # the scores are the forward's: softmax probability of the given label, its logit less the other one
    r = straight[0]
    logits = _logits(torch.tensor([int(r["row"])]), int(r["epoch"]))[0]
    label = int(r["row"]) % 2
    assert r["gold_prob"] == pytest.approx(torch.softmax(logits, 0)[label].item(), rel=1e-6)
    assert r["margin"] == pytest.approx((logits[label] - logits[1 - label]).item(), rel=1e-5)
    assert r["predicted"] == int(logits.argmax()) and r["label"] == label
    # the checkpoint at step 4 holds the rows up to it; a resume from it, into another folder, ends with the same file
    saved = np.load(tmp_path / "a" / "step" / layout.DYNAMICS)
    assert saved["step"].max() == 4 and len(saved) == 4 * BATCH * WORLD
    resumed = _train(tmp_path / "b", range(5, 2 * STEPS + 1), resumed_from=tmp_path / "a" / "step")
    assert np.array_equal(np.sort(resumed, order=["epoch", "row"]), np.sort(straight, order=["epoch", "row"]))


def test_a_row_id_names_its_file_row_through_dropping_shuffling_and_batching(tmp_path, tiny_bert):
    rows = make_sentences(30, 4)
    rows[5]["text"] = "  "  # dropped (data.drop_bad_rows): the ids after it still name their file rows
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
             "validation": str(write_jsonl(tmp_path / "validation.jsonl", make_sentences(6, 5)))}
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    out = classification.prepare(DataConfig(data_files=files, test_split=None, drop_bad_rows=True), tok, seed=3,
                                 log=lambda _: None)
    ids = out.train[sources.ROW_ID_KEY]
    assert sorted(ids) == [i for i in range(30) if i != 5] and ids != sorted(ids)  # shuffled, every row once
    assert all(rows[i]["text"] == t for i, t in zip(out.rows["train"][sources.ROW_ID_KEY], out.rows["train"]["text"]))
    decoded = [tok.decode(x, skip_special_tokens=True) for x in out.train["input_ids"]]
    assert all(rows[i]["text"] == d for i, d in zip(ids, decoded))
    batch = DataCollatorWithPadding(tok)([out.train[i] for i in range(4)])  # the classification loaders' collator
    assert batch[sources.ROW_ID_KEY].tolist() == ids[:4]
    # the digest a resume compares leaves the ids out: runs from before them still match
    assert sources.digest(out.train) == sources.digest(out.train.remove_columns(sources.ROW_ID_KEY))


def _run_folder(root: Path, records: np.ndarray, train_rows: int = 4) -> Path:
    root.mkdir(parents=True)
    names = ["neg", "pos"]
    preds = [{"row": i, "text": f"test {i}", "label": names[i % 2], "prediction": names[i % 2],
              "probabilities": [0.2, 0.8] if i % 2 else [0.7, 0.3]} for i in range(6)]
    (root / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (root / "metrics.json").write_text(json.dumps({"label_names": names, "train": {"steps": 3}}))
    stored.append(root / layout.DYNAMICS, records)
    rows = Dataset.from_dict({"text": [f"train row {i} | bar" for i in range(train_rows)],
                              "labels": [0, 1, 0, 1][:train_rows], sources.ROW_ID_KEY: list(range(train_rows))})
    assert datamap.write_for_run(RunDir(root), rows.shuffle(seed=1), names, "text", None, "softmax of the logits",
                                 log=lambda _: None)
    return root


def test_the_report_shows_the_data_map_and_the_suspects(tmp_path):
    run = _run_folder(tmp_path / "run", HAND)
    paths = pages.build([run])
    (doc,) = json.loads(paths["json"].read_text())["runs"]
    mapped = doc["data_map"]
    assert "points" not in mapped and "_data_map_points" not in doc  # drawn, not kept in report.json
    assert mapped["rows"] == 4 and mapped["regions"] == {"easy-to-learn": 2, "ambiguous": 1, "hard-to-learn": 1}
    first = mapped["suspects"][0]
    assert (first["row"], first["text"], first["label"], first["preferred"]) == (1, "train row 1 | bar", "pos", "neg")
    assert first["aum"] == pytest.approx(-2.5 / 3, abs=1e-4)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "### Training data map" in md and "#### Training rows most likely mislabeled (lowest AUM first, 4)" in md
    assert "| 1 | train row 1 / bar | pos | neg | -0.8333 | 0.3000 | 0.2160 | 1 of 3 epochs |" in md
    assert "Rows trained in one epoch only (the run stopped within an epoch): 1;" in md and "Dataset Cartography" in md
    assert 'data-plot="datamap_run"' in page and "<h3>Training rows most likely mislabeled" in page
    assert "<td>train row 1 | bar</td><td>pos</td><td>neg</td><td>-0.8333</td>" in page


def test_a_run_of_one_epoch_says_what_it_cannot_measure(tmp_path):
    run = _run_folder(tmp_path / "run", HAND[HAND["epoch"] == 0])
    paths = pages.build([run])
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "Variability is not measured: each row was trained in one epoch, and variability needs several" in md
    assert "not measured (1 epoch)" in md and 'data-plot="datamap_run"' in page
    assert json.loads(paths["json"].read_text())["runs"][0]["data_map"]["regions"]["ambiguous"] == 0


def test_label_word_rows_are_scored_by_their_words_first_tokens():
    """A causal LM's forward: the logits one position before each row's first trained token, over the label
    words' first tokens, against the row's class."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from llmkit.data.lm import CLASS_KEY
    from llmkit.data.packing import IGNORE

    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 3:], labels[1, 2:4] = 7, 9  # row 0 answers from position 3, row 1 from 2
    label, prob, margin, predicted = dynamics.label_word_scores([7, 9])(
        CausalLMOutputWithPast(logits=logits), {"labels": labels, CLASS_KEY: torch.tensor([0, 1])})
    words = torch.stack([logits[0, 2, [7, 9]], logits[1, 1, [7, 9]]])
    assert prob.tolist() == pytest.approx([torch.softmax(words[0], 0)[0].item(), torch.softmax(words[1], 0)[1].item()])
    assert margin.tolist() == pytest.approx([(words[0, 0] - words[0, 1]).item(), (words[1, 1] - words[1, 0]).item()])
    assert predicted.tolist() == words.argmax(1).tolist() and label.tolist() == [0, 1]


def test_a_stream_has_no_data_map_and_says_why(tmp_path):
    """Label words on a stream are refused by the config (the only streamed run with labels); a recorder handed a
    stream all the same records nothing and says why in one line."""
    from llmkit.config import load_config
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match="data.streaming.*not data.mixture or label words"):
        load_config(None, ["--data.streaming", "true", "--train.max_steps", "4", "--data.prompt_template",
                           "is this {text}"])
    said = []
    run = SimpleNamespace(**{**vars(_fake_run(tmp_path, 0, 1)), "log": said.append})
    recorder = dynamics.Recorder(run, dynamics.classifier_scores, "test")
    recorder.start(SimpleNamespace(epoch=0, step=0), None, stream=True)
    recorder.batch(1, SimpleNamespace(logits=torch.zeros(2, 2)), {"labels": torch.zeros(2, dtype=torch.long)})
    recorder.flush()
    assert said == ["training dynamics: not recorded: streamed rows have no identity to count epochs by"]
    assert not (tmp_path / layout.DYNAMICS).exists() and recorder.summary() == {"scores": None}
