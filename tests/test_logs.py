"""Other libraries' output in llmkit's processes (llmkit.logs): rank 0 says each warning once, another rank only
errors, LLMKIT_VERBOSE=1 changes nothing; transformers' load report as one llmkit line; the launcher's held lines."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import datasets
import pytest
import transformers

from llmkit import logs, model
from llmkit.config import ModelConfig


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


@pytest.fixture
def run_process(monkeypatch):
    """Set a rank (and LLMKIT_VERBOSE) as a launcher would; what logs.for_run changes is put back afterwards."""
    deepspeed = logging.getLogger("DeepSpeed")
    filters, verbosity = list(deepspeed.filters), (transformers.logging.get_verbosity(), datasets.logging.get_verbosity())
    bars = transformers.utils.logging.is_progress_bar_enabled()
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv(logs.VERBOSE, raising=False)
    monkeypatch.setattr(sys, "warnoptions", [])  # as a run without python -W starts

    def start(rank: int, verbose: bool = False) -> None:
        monkeypatch.setenv("RANK", str(rank))
        if verbose:
            monkeypatch.setenv(logs.VERBOSE, "1")
        logs.for_run()

    with warnings.catch_warnings():
        yield start
    deepspeed.filters[:] = filters
    transformers.logging.set_verbosity(verbosity[0])
    datasets.logging.set_verbosity(verbosity[1])
    if bars:
        transformers.utils.logging.enable_progress_bar()


def _emit(text: str) -> tuple[list[str], list[str]]:
    """A FutureWarning and a DeepSpeed warning, each twice, and a DeepSpeed error: what is shown of each."""
    handler = Records()
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            for _ in range(2):
                warnings.warn(f"{text} is deprecated", FutureWarning, stacklevel=1)
                deepspeed.warning(f"{text}: a notice")
            deepspeed.error(f"{text}: an error")
    finally:
        deepspeed.removeHandler(handler)
    return [str(w.message) for w in caught], [r.getMessage() for r in handler.seen]


def test_rank_0_says_each_warning_once(run_process):
    run_process(0)
    shown, logged = _emit("rank-0 case")
    assert shown == ["rank-0 case is deprecated"]
    assert logged == ["rank-0 case: a notice", "rank-0 case: an error"]
    assert transformers.logging.get_verbosity() == logging.WARNING  # rank 0 keeps transformers' warnings
    assert not transformers.utils.logging.is_progress_bar_enabled()


def test_another_rank_says_only_errors(run_process):
    run_process(1)
    shown, logged = _emit("rank-1 case")
    assert shown == [] and logged == ["rank-1 case: an error"]
    assert transformers.logging.get_verbosity() == logging.ERROR
    assert datasets.logging.get_verbosity() == logging.ERROR


def test_verbose_leaves_every_library_as_it_was(run_process, monkeypatch):
    monkeypatch.setattr(logs, "cpu_only", lambda: True)
    run_process(1, verbose=True)
    shown, logged = _emit("verbose case")
    assert set(shown) == {"verbose case is deprecated"}  # as Python's filters say, rank or not
    assert logged == ["verbose case: a notice"] * 2 + ["verbose case: an error"]
    assert transformers.logging.get_verbosity() == logging.WARNING
    assert "DS_ACCELERATOR" not in os.environ


def test_a_cpu_run_tells_deepspeed_so(run_process, monkeypatch):
    monkeypatch.setattr(logs, "cpu_only", lambda: True)
    run_process(0)
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed then skips its "unable to detect a GPU" warning


def test_only_rank_0_prints_to_stdout_meanwhile(monkeypatch, capsys):
    monkeypatch.delenv(logs.VERBOSE, raising=False)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        with logs.main_rank_stdout():
            print(f"built on rank {rank}")
    assert capsys.readouterr().out == "built on rank 0\n"


def _load_reports(tiny_bert, labels, log):
    handler = Records()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        model.load_classifier(ModelConfig(name_or_path=str(tiny_bert)), labels, log=log)
    finally:
        logger.removeHandler(handler)
    return [r for r in handler.seen if "LOAD REPORT" in r.getMessage()]


def test_the_load_report_is_one_llmkit_line(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.delenv(logs.VERBOSE, raising=False)
    said: list[str] = []
    assert _load_reports(tiny_bert, ["a", "b"], said.append) == [] and said == []  # the checkpoint fits exactly
    assert _load_reports(tiny_bert, ["neg", "neu", "pos"], said.append) == []  # a 2-class head for 3 classes
    assert said == ["model: initialised fresh (another shape in the checkpoint): classifier.bias (2,) -> (3,), "
                    "classifier.weight (2, 32) -> (3, 32)"]
    assert len(_load_reports(tiny_bert, ["neg", "neu", "pos"], None)) == 1  # no log: transformers' table, as before
    monkeypatch.setenv(logs.VERBOSE, "1")
    said.clear()
    assert len(_load_reports(tiny_bert, ["neg", "neu", "pos"], said.append)) == 1 and len(said) == 1  # both


def test_load_report_names_missing_and_unused_weights():
    info = {"missing_keys": {"classifier.weight", "classifier.bias"}, "unexpected_keys": {f"pooler.{i}" for i in range(6)},
            "mismatched_keys": set()}
    assert logs.load_report(info) == ("model: initialised fresh (not in the checkpoint): classifier.bias, "
                                      "classifier.weight; checkpoint weights this model does not use: pooler.0, "
                                      "pooler.1, pooler.2, pooler.3 and 2 more")
    assert logs.load_report({"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}) is None


@pytest.mark.parametrize(("how", "replayed"), [("success", ["an error"]), ("user error", []),
                                               ("crash", ["a banner", "an error"])])
def test_held_launcher_lines(monkeypatch, how, replayed):
    """llmkit launch holds torch's launcher lines: after a user error none, after a crash all, else errors only."""
    monkeypatch.delenv(logs.VERBOSE, raising=False)
    parent, child = logging.getLogger("llmkit-test-launcher"), logging.getLogger("llmkit-test-launcher.run")
    handler = Records()
    parent.addHandler(handler)
    parent.propagate = False
    try:
        with pytest.raises(RuntimeError) if how == "crash" else warnings.catch_warnings():
            with logs.Held("llmkit-test-launcher") as held:
                child.warning("a banner")
                child.error("an error")
                assert handler.seen == []
                if how == "user error":
                    held.drop()
                if how == "crash":
                    raise RuntimeError("a rank crashed")
        assert [r.getMessage() for r in handler.seen] == replayed
        assert handler in parent.handlers and not any(isinstance(h, logs.Held) for h in parent.handlers)
    finally:
        parent.removeHandler(handler)
        parent.propagate = True
