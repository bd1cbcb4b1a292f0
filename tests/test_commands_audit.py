"""`llmkit audit`: stratified folds, cleanlab's ranking on out-of-sample probabilities, the files it writes, and
one real audit of a tiny config with planted label errors (two folds, each a launch), gone on with after a stop."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    FILLER,
    LAUNCH_ENV,
    LAUNCHES,
    NEGATIVE,
    POSITIVE,
    ROOT,
    build_tiny_data,
    free_ports,
    read_jsonl,
    write_config,
    write_jsonl,
)

from llmkit.commands import audit
from llmkit.errors import LlmkitError


def test_folds_hold_every_row_out_once_with_every_label_in_each():
    labels = np.array([0] * 30 + [1] * 12 + [2] * 6)
    held = audit.folds(labels, 3, seed=0)
    assert sorted(np.concatenate(held).tolist()) == list(range(len(labels)))
    for fold in held:
        assert np.bincount(labels[fold], minlength=3).tolist() == [10, 4, 2]
    assert [f.tolist() for f in audit.folds(labels, 3, seed=0)] == [f.tolist() for f in held]  # seeded
    with pytest.raises(LlmkitError, match="a label has only 6 training rows, fewer than the folds"):
        audit.folds(labels, 7, seed=0)
    with pytest.raises(LlmkitError, match="at least 2 folds"):
        audit.folds(labels, 1, seed=0)


def test_the_ranking_puts_rows_the_model_contradicts_first():
    """Out-of-sample probabilities that agree with most labels and confidently contradict three: cleanlab flags
    those three, worst first, and the ranking holds every row once."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 50)
    probs = np.where(labels[:, None] == np.arange(2), 0.85, 0.15) + rng.uniform(-0.05, 0.05, (100, 1)) * [1, -1]
    wrong = [7, 40, 81]
    for i, p in zip(wrong, (0.95, 0.98, 0.94)):  # the model sure of the other label; row 40 the surest
        probs[i] = [1 - p, p] if labels[i] == 0 else [p, 1 - p]
    flagged, quality, order = audit.rank(labels, probs)
    assert sorted(flagged.tolist()) == wrong and flagged[0] == 40
    assert sorted(order.tolist()) == list(range(100)) and set(order[:3].tolist()) == set(wrong)
    assert quality[40] == pytest.approx(0.02)


def test_the_suspects_file_and_notes_say_what_to_do(tmp_path):
    rows = {"row": np.arange(10, 20), "label": np.array([0, 1] * 5), "text": [f"text {i} | a" for i in range(10)],
            "pair": None, "names": ["neg", "pos"]}
    probs = np.where(rows["label"][:, None] == np.arange(2), 0.9, 0.1)
    probs[3] = [0.95, 0.05]  # row id 13, given pos
    summary = {"config": "c.yaml", "recipe": "classification", "folds": 2}
    suspects = audit._write(tmp_path, rows, probs, summary)
    assert [s["row"] for s in suspects] == [13] and suspects[0]["suggested"] == "neg"
    assert read_jsonl(tmp_path / audit.SUSPECTS) == suspects
    ranking = read_jsonl(tmp_path / audit.RANKING)
    assert len(ranking) == 10 and ranking[0]["row"] == 13 and ranking[0]["flagged"]
    assert not any(r["flagged"] for r in ranking[1:])
    doc = json.loads((tmp_path / audit.AUDIT).read_text())
    assert doc["flagged"] == 1 and doc["rows"] == 10 and doc["out_of_sample_accuracy"] == 0.9
    notes = (tmp_path / audit.NOTES).read_text()
    assert "| 13 | pos | neg | 0.050 | text 3 \\| a |" in notes and "--data.exclude_rows suspects.jsonl" in notes


def _audit(cfg, out, *extra, trains: int = 0):
    LAUNCHES.extend(["audit fold"] * trains)  # the folds it trains: each one `accelerate launch`
    cmd = [sys.executable, "-m", "llmkit.cli", "audit", "classification", "--config", str(cfg), "--accelerate-config",
           "single", "--folds", "2", "--output", str(out), "--main-process-port", str(free_ports(1)[0]), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_an_audit_of_a_tiny_config_flags_planted_label_errors_and_goes_on_after_a_stop(tmp_path, tiny_bert):
    """Two folds of a real run each (one process): 8 of 96 training labels flipped; the flipped rows rank above
    the rest and suspects.jsonl names its rows by id with their text and label as the file holds them (the form
    data.exclude_rows reads: test_data_classification). Run again with the same arguments, the audit trains
    nothing; with other arguments it refuses."""
    data = build_tiny_data(tmp_path)  # its validation and test splits
    rng, rows = random.Random(5), []
    for i in range(96):  # three sentiment words in few others: a tiny model learns it in 8 epochs of 48 rows
        words = rng.choices(FILLER, k=rng.randint(1, 4)) + rng.choices(POSITIVE if i % 2 else NEGATIVE, k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": ("pos", "neg")[(i % 2 == 0) != (i % 12 == 3)]})
    flipped = list(range(3, 96, 12))
    write_jsonl(data / "train.jsonl", rows)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, data, tmp_path / "unused", epochs=8, learning_rate=3e-3,
                       warmup_ratio=0.1)
    out = tmp_path / "audit"
    proc = _audit(cfg, out, trains=2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("training on 48 rows, holding out 48") == 2
    ranking = read_jsonl(out / audit.RANKING)
    assert sorted(r["row"] for r in ranking) == list(range(96))
    top = {r["row"] for r in ranking[:len(flipped)]}
    assert len(top & set(flipped)) >= 6, (sorted(top), flipped)  # 7 of 8 on the machine it was written on
    suspects = read_jsonl(out / audit.SUSPECTS)
    assert suspects and {s["row"] for s in suspects} <= {r["row"] for r in ranking if r["flagged"]}
    for s in suspects:
        assert rows[s["row"]]["text"] == s["text"] and rows[s["row"]]["label"] == s["label"] != s["suggested"]
    for k in (0, 1):  # each fold trained on the other fold's rows only
        excluded = {int(x) for x in (out / f"fold-{k}" / "exclude_rows.txt").read_text().split()}
        assert len(excluded) == 48
    again = _audit(cfg, out)
    assert again.returncode == 0 and "training on" not in again.stdout, again.stderr[-3000:]
    assert read_jsonl(out / audit.RANKING) == ranking
    other = _audit(cfg, out, "--folds", "3")
    assert other.returncode == 2 and "holds an audit asked with other settings" in other.stderr
