"""Training dynamics, recorded for free: each training row's given-label probability, margin and predicted label,
taken from the forward pass the step already makes, keyed by the row's id (llmkit.data.sources.ROW_ID_KEY).

Each rank keeps its rows' scores on the device (a few numbers a row, no transfer per step); at the end of each
epoch, at each checkpoint and at the end of training every rank hands them over at once and rank 0 appends them
to the run's file (llmkit.rundir.dynamics). Every row is recorded once per epoch whatever the world size: the
padding rows Accelerate repeats to even out the ranks' last batches are recognised by id and dropped (the first
time a row is trained in an epoch is the one kept). A checkpoint holds a copy of the file as it stood, so a resume,
into this folder or another, continues exactly the records of the steps it continues from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmkit.data import label_prompts, lm
from llmkit.data.packing import IGNORE
from llmkit.data.sources import ROW_ID_KEY
from llmkit.errors import LlmkitError
from llmkit.rundir import dynamics as stored
from llmkit.rundir import layout

# (model outputs, batch) -> per row: given label, its probability, its margin, the predicted label
Score = Callable[[object, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
COLUMNS = ("row", "epoch", "step", "label", "predicted", "gold_prob", "margin")  # a pending row, in this order


def scores(logits: torch.Tensor, label: torch.Tensor):
    """Per row of (rows, labels) scores: the given label, its softmax probability, its margin (its score less the
    largest other one: Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin Ranking")
    and the label scored highest."""
    logits = logits.float()
    gold = label[:, None]
    prob = torch.softmax(logits, -1).gather(1, gold)[:, 0]
    other = logits.scatter(1, gold, float("-inf")).amax(1)
    return label, prob, logits.gather(1, gold)[:, 0] - other, logits.argmax(1)


def classifier_scores(outputs, batch: dict):
    """A sequence classifier's logits against the batch's labels."""
    return scores(outputs.logits, batch["labels"])


def label_word_scores(first_tokens: list[int]) -> Score:
    """A label-word causal LM: the scores of each label word's first token at the position that predicts the
    row's answer (the one forward sees only the given word's tokens; their first position scores every word)."""
    table = torch.tensor(first_tokens, dtype=torch.long)

    def score(outputs, batch: dict):
        labels = batch["labels"]
        start = (labels != IGNORE).int().argmax(1)  # each row's first trained token: its answer's first
        rows = torch.arange(len(start), device=labels.device)
        # logits at t-1 predict token t; the chunked loss (llmkit.model.lm_head) kept the model's logits only there
        at = outputs.logits[:, 0] if "logits_positions" in outputs else outputs.logits[rows, start - 1]
        words = at[:, table.to(labels.device)]
        return scores(words, batch[lm.CLASS_KEY])

    return score


class Recorder:
    """Collects the rows' scores during `fit` (the loop calls it through train.hooks) and writes them."""

    def __init__(self, run, score: Score, what: str):
        self.run, self.acc, self.score, self.what = run, run.accelerator, score, what
        self.pending: list[torch.Tensor] = []
        self.seen: dict[int, np.ndarray] = {}  # rank 0: the row ids written so far for the epoch in progress
        self.state = None  # the loop's TrainerState: the epoch a batch belongs to
        self.on = True

    @property
    def path(self) -> Path:
        return self.run.dir.dynamics

    def start(self, state, resumed_from: Path | None, stream: bool) -> None:
        """Before the first step, every rank: a resume continues the checkpoint's records; a fresh run starts none."""
        self.state = state
        if stream:  # the config refuses label words on a stream (config.checks); kept off here all the same
            self.on = False
            self.run.log("training dynamics: not recorded: streamed rows have no identity to count epochs by")
            return
        if not self.acc.is_main_process:
            return
        saved = resumed_from / layout.DYNAMICS if resumed_from is not None else None
        if saved is not None and saved.is_file():
            stored.copy(saved, self.path)
        else:
            self.path.unlink(missing_ok=True)
            if resumed_from is not None:
                self.run.log(f"training dynamics: checkpoint {resumed_from} holds none (an older llmkit wrote it): "
                             f"the data map counts only the steps after {state.step}")
        records = stored.read(self.path)
        self.seen = {state.epoch: np.unique(records["row"][records["epoch"] == state.epoch])}
        self.run.log(f"training dynamics: every training row's given-label probability and margin per epoch "
                     f"({self.what}) into {self.path}")

    @torch.no_grad()
    def batch(self, step: int, outputs, batch: dict) -> None:
        """After the forward of a micro-batch of optimizer step `step`: its rows' scores, kept where they are."""
        if not self.on:
            return
        label, prob, margin, predicted = self.score(outputs, batch)
        ids = batch[ROW_ID_KEY]
        self.pending.append(torch.stack([ids.double(), ids.new_full(ids.shape, self.state.epoch).double(),
                                         ids.new_full(ids.shape, step).double(), label.double(), predicted.double(),
                                         prob.double(), margin.double()], 1))

    def local(self) -> torch.Tensor:
        """This rank's rows since the last flush, (rows, COLUMNS) float64 (exact for ids and steps below 2**53)."""
        mine = torch.cat(self.pending) if self.pending else torch.empty(0, len(COLUMNS), dtype=torch.float64,
                                                                        device=self.acc.device)
        self.pending = []
        return mine

    def flush(self) -> None:
        """Every rank together: the rows since the last flush, from every rank, appended to the file by rank 0."""
        if not self.on:
            return
        mine = self.local()
        if self.acc.num_processes > 1:
            counts = self.acc.gather(torch.tensor([len(mine)], device=mine.device)).tolist()
            if not any(counts):
                return
            padded = self.acc.gather(self.acc.pad_across_processes(mine, dim=0))
            width = max(counts)
            mine = torch.cat([padded[r * width:r * width + n] for r, n in enumerate(counts)])
        if self.acc.is_main_process:
            self.write(mine.cpu().numpy())

    def write(self, gathered: np.ndarray) -> int:
        """Rank 0: append the gathered rows (ranks in order), each row's first time in its epoch only; returns how
        many were new."""
        records = np.empty(len(gathered), stored.RECORD)
        for i, name in enumerate(COLUMNS):
            records[name] = gathered[:, i]
        records = records[np.argsort(records["step"], kind="stable")]  # a row's first time in the epoch first
        kept = []
        for epoch in np.unique(records["epoch"]):
            these = records[records["epoch"] == epoch]
            _, first = np.unique(these["row"], return_index=True)
            these = these[np.sort(first)]
            these = these[~np.isin(these["row"], self.seen.get(int(epoch), []))]  # Accelerate's padding repeats
            self.seen[int(epoch)] = np.union1d(self.seen.get(int(epoch), []), these["row"]).astype(np.int64)
            kept.append(these)
        if self.seen:  # a row is repeated within its epoch only: earlier epochs are complete
            last = max(self.seen)
            self.seen = {last: self.seen[last]}
        new = np.concatenate(kept) if kept else records
        stored.append(self.path, new[np.lexsort((new["row"], new["step"]))])
        return len(new)

    def into_checkpoint(self, folder: Path) -> None:
        """Rank 0, before the checkpoint's manifest: the records up to its step, beside its weights."""
        if self.on and self.path.is_file():
            stored.copy(self.path, folder / layout.DYNAMICS)

    def summary(self) -> dict:
        """What metrics.json says of the recording."""
        return {"scores": self.what, "file": layout.DYNAMICS} if self.on else {"scores": None}


def for_classifier(run) -> Recorder:
    """The recorder of a sequence classifier's run."""
    return Recorder(run, classifier_scores, "softmax of the classifier's logits")


def for_label_words(run, tokenizer, data: lm.LMData) -> Recorder | None:
    """The recorder of a label-word causal LM (data.prompt_template); None for other causal-LM data, or where two
    label words begin with the same token (the first tokens could not tell them apart: said in the log)."""
    if data.mode != "labels":
        return None
    targets = label_prompts.label_candidates(tokenizer, run.cfg.data, data.label_words, "example")["targets"]
    trained = [[t for t in target if t != IGNORE] for target in targets]
    firsts = [t[0] for t in trained]
    if len(set(firsts)) < len(firsts):
        run.log(f"training dynamics: not recorded: the label words {data.label_words} share a first token, which "
                "is all the training forward scores for every word")
        return None
    try:  # the tokens that end an answer: those of an empty one
        ends = len([t for t in label_prompts.label_candidates(tokenizer, run.cfg.data, [""], "example")["targets"][0]
                    if t != IGNORE])
    except LlmkitError:
        ends = None
    whole = ends is not None and all(len(t) - ends == 1 for t in trained)  # each word one token, then the end
    what = ("softmax over the label words, each one token" if whole else
            "softmax over the label words' first tokens (a word of several tokens is scored by its first)")
    return Recorder(run, label_word_scores(firsts), what)
