"""Streaming (data.streaming): the train split read as a datasets IterableDataset, each rank its own share
(`Stream.share`: its own files, or every world-th row), tokenized and packed on the fly, in stream order. A
checkpoint holds each rank's position in its stream (the IterableDataset's own state_dict), so a resumed run
neither replays nor skips rows.

The stream is read pass after pass (set_epoch) until train.max_steps: ranks whose shares differ in length never
wait on each other for an epoch end. No shuffle buffer: datasets does not save one, and a resume would lose
the rows in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from llmkit.data.packing import blocks_of, ids_of, with_eos
from llmkit.errors import LlmkitError

DOCS_PER_MAP = 1000  # documents packed together: at most one short block per this many


def pack_stream(ds: IterableDataset, tokenizer, column: str, block_size: int) -> IterableDataset:
    """Text rows packed into blocks of `block_size` tokens as they stream by: each map batch of documents is one
    stream cut into blocks (its last block short, padded and masked), so a resume can restart at a batch."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def cut(batch: pa.Table) -> pa.Table:
        texts = [t for t in batch.column(column).to_pylist() if isinstance(t, str) and t.strip()]
        stream = with_eos(ids_of(tokenizer, texts) if texts else [], eos)
        blocks = blocks_of(stream, block_size, pad)
        return pa.table({k: pa.FixedSizeListArray.from_arrays(v.reshape(-1), block_size) for k, v in blocks.items()})

    # Arrow batches in and out: no Python object per row or per token on the way
    return ds.with_format("arrow").map(cut, batched=True, batch_size=DOCS_PER_MAP, remove_columns=[column]
                                       ).with_format(None)


@dataclass
class Stream:
    """A streamed split before it is shared out: the rows as read, and what turns a rank's share of them into
    training examples (tokenizing, packing), applied to that share only."""
    rows: IterableDataset
    transform: Callable[[IterableDataset], IterableDataset]

    def share(self, rank: int, world: int) -> IterableDataset:
        if self.rows.n_shards % world == 0:  # each rank reads only its own files
            return self.transform(split_dataset_by_node(self.rows, rank=rank, world_size=world))
        # Fewer files than ranks (or not a multiple): every rank reads every row and keeps each world-th one, before
        # the transform. split_dataset_by_node would step over the transform's output instead, so each rank would
        # tokenize the whole stream to keep 1/world of it.
        return self.transform(self.rows.with_format("arrow").filter(
            lambda _, idx: pa.array(np.asarray(idx) % world == rank), with_indices=True, batched=True,
            batch_size=DOCS_PER_MAP).with_format(None))


class StreamLoader:
    """This rank's training batches from its share of the stream, pass after pass (training stops at
    train.max_steps); `state_dict()` between batches is the exact position to resume from."""

    def __init__(self, stream: Stream, batch_size: int, collate, rank: int, world: int):
        self.dataset = stream.share(rank, world)
        self.batch_size, self.collate, self.rank = batch_size, collate, rank
        self.examples = 0  # rows this rank has trained on (all passes)
        self._resumed = False

    def __iter__(self):
        resumed = self._resumed  # a pass resumed at its very end yields nothing, legitimately
        self._resumed = False
        while True:
            rows, yielded = [], False
            for row in self.dataset:
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(rows)
                    rows, yielded = [], True
            if rows:
                yield self._batch(rows)
                yielded = True
            if not (yielded or resumed):
                raise LlmkitError(f"rank {self.rank}'s share of the streamed train split is empty: the stream has "
                                  "fewer rows than ranks, or every row was dropped. Use more data or fewer ranks.")
            resumed = False
            self.dataset.set_epoch(self.dataset.epoch + 1)  # the next pass

    def _batch(self, rows: list[dict]) -> dict:
        self.examples += len(rows)
        return self.collate(rows)

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.dataset.set_epoch(state["dataset"]["epoch"])
        self.examples = state["examples"]
        self._resumed = True


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
