"""Streaming (data.streaming): the train split read as a datasets IterableDataset, each rank its own share
(`split_dataset_by_node`), tokenized and packed on the fly, in stream order. A checkpoint holds each rank's
position in its stream (the IterableDataset's own state_dict), so a resumed run neither replays nor skips rows.

The stream is read pass after pass (set_epoch) until train.max_steps: ranks whose shares differ in length never
wait on each other for an epoch end. No shuffle buffer: datasets does not save one, and a resume would lose
the rows in it."""

from __future__ import annotations

import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from llmkit.data.packing import blocks_of
from llmkit.errors import LlmkitError

DOCS_PER_MAP = 1000  # documents packed together: at most one short block per this many


def pack_stream(ds: IterableDataset, tokenizer, column: str, block_size: int) -> IterableDataset:
    """Text rows packed into blocks of `block_size` tokens as they stream by: each map batch of documents is one
    stream cut into blocks (its last block short, padded and masked), so a resume can restart at a batch."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def cut(batch):
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
        return {k: v.tolist() for k, v in blocks_of(stream, block_size, pad).items()}

    return ds.map(cut, batched=True, batch_size=DOCS_PER_MAP, remove_columns=[column])


class StreamLoader:
    """This rank's training batches from its share of the stream, pass after pass (training stops at
    train.max_steps); `state_dict()` between batches is the exact position to resume from."""

    def __init__(self, dataset: IterableDataset, batch_size: int, collate, rank: int, world: int):
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
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
