"""Batching: length-grouped training batches aligned across ranks, DataLoaders for both recipes, and a dataset
wrapper whose read errors name the row. Loaders are returned unprepared; the training loop shards them."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from llmkit import faults
from llmkit.config import Config
from llmkit.data.classification import ClassificationData
from llmkit.data.lm import CandidateCollator, FlatCollator, LMCollator, LMData
from llmkit.data.streaming import Stream, StreamLoader
from llmkit.errors import LlmkitError


class LengthGroupedBatchSampler:
    """Batches of similar length for training, in random order.

    Rows are sorted by (length, random tie-break); consecutive batches are grouped `per_step` at a time (the
    micro-batches of one optimizer step: ranks x accumulation; Accelerate deals batch i to rank i % ranks), so
    the batches of one step are equally long and the sequence does not depend on how the step is split among
    ranks (an elastic resume continues it). Groups are shuffled each epoch; the one short group (and short
    batch) stays last, where Accelerate expects it.
    """

    def __init__(self, lengths, batch_size: int, per_step: int = 1, seed: int = 0):
        self.lengths, self.batch_size, self.per_step, self.seed = lengths, batch_size, per_step, seed
        self.epoch = 0
        self.drop_last = False  # read by Accelerate's BatchSamplerShard

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        noise = torch.rand(len(self.lengths), generator=gen).numpy()
        order = np.lexsort((noise, np.asarray(self.lengths))).tolist()  # by length, ties in random order
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        groups = [batches[i:i + self.per_step] for i in range(0, len(batches), self.per_step)]
        tail = []
        if len(groups[-1]) < self.per_step or len(groups[-1][-1]) < self.batch_size:
            tail = groups.pop()
        for g in torch.randperm(len(groups), generator=gen).tolist():
            yield from groups[g]
        yield from tail


class RowErrors(torch.utils.data.Dataset):
    """A dataset whose failures name the row: an exception while reading row i becomes a clear error."""

    def __init__(self, dataset, rank: int):
        self.dataset, self.rank = dataset, rank
        self.fault = faults.POINT == "row"  # crash tests only

    def __len__(self) -> int:
        return len(self.dataset)

    def _row(self, i: int):
        try:
            if self.fault and faults.hit("row", int(i), self.rank):
                raise ValueError("a broken row (injected)")
            return self.dataset[i]
        except Exception as exc:
            raise LlmkitError(f"reading training row {i} failed: {exc.__class__.__name__}: {exc}. Fix or drop that "
                              "row of the train split (its index is after the shuffle by train.seed).") from exc

    def __getitem__(self, i: int):
        return self._row(i)

    def __getitems__(self, indices: list[int]) -> list:
        # the datasets library reads a whole batch at once (fast); on failure, find the row one by one
        if not self.fault and hasattr(self.dataset, "__getitems__"):
            try:
                return self.dataset.__getitems__(indices)
            except Exception:
                pass
        return [self._row(i) for i in indices]


def loader_options(cfg: Config, persistent: bool = True) -> dict:
    """DataLoader workers and pinned memory from train.*: pinning only pays off when batches go to a GPU."""
    t = cfg.train
    pin = torch.cuda.is_available() if t.pin_memory is None else t.pin_memory
    return {"num_workers": t.dataloader_workers, "pin_memory": pin,
            "persistent_workers": persistent and t.dataloader_workers > 0}


def _worker_seeds(seed: int) -> torch.Generator:
    """Where a DataLoader draws each iterator's worker base seed. Without one it draws from torch's global RNG
    (dropout's) or from the shuffle's generator, once per epoch, or once per run with persistent workers: so
    train.dataloader_workers, or an evaluation, would change the order or the masks of the steps after it."""
    return torch.Generator().manual_seed(seed)


def train_loader(cfg: Config, dataset, lengths: list[int] | None, collate, rank: int, world: int) -> DataLoader:
    """Batches of similar length (when `lengths` are known and data.group_by_length is on), else shuffled rows;
    either way the order of an epoch depends on train.seed and the epoch alone."""
    t = cfg.train
    if lengths is None or not cfg.data.group_by_length:
        lengths = [0] * len(dataset)
    sampler = LengthGroupedBatchSampler(lengths, t.per_device_batch_size, world * t.gradient_accumulation_steps,
                                        seed=t.seed)
    return DataLoader(RowErrors(dataset, rank), batch_sampler=sampler, collate_fn=collate,
                      generator=_worker_seeds(t.seed), **loader_options(cfg))


def _eval_loaders(cfg: Config, splits: dict, collate) -> dict[str, DataLoader]:
    return {name: DataLoader(split, batch_size=cfg.train.eval_batch_size, collate_fn=collate,
                             generator=_worker_seeds(cfg.train.seed), **loader_options(cfg, persistent=False))
            for name, split in splits.items() if split is not None}


def classification_loaders(cfg: Config, data: ClassificationData, tokenizer, rank: int, world: int):
    """Train loader (length-grouped or shuffled) and validation/test loaders (length-sorted)."""
    collate = DataCollatorWithPadding(tokenizer)
    train = train_loader(cfg, data.train, data.train_lengths, collate, rank, world)
    return train, _eval_loaders(cfg, {"validation": data.validation, "test": data.test}, collate)


def lm_loaders(cfg: Config, data: LMData, tokenizer, rank: int, world: int):
    """Train loader (length-grouped rows, or shuffled blocks) and validation/test loaders (label candidates for
    generative classification)."""
    collate = LMCollator(tokenizer.pad_token_id)
    packed_rows = cfg.data.packing and data.mode in ("prompt_response", "chat", "mixed")
    train_collate = FlatCollator(cfg.model.attn_implementation == "flash_attention_2") if packed_rows else collate
    if isinstance(data.train, Stream):  # data.streaming: this rank's share, read as it comes
        train = StreamLoader(data.train, cfg.train.per_device_batch_size, train_collate, rank, world)
    else:
        train = train_loader(cfg, data.train, data.train_lengths, train_collate, rank, world)
    eval_collate = CandidateCollator(tokenizer.pad_token_id) if data.mode == "labels" else collate
    return train, _eval_loaders(cfg, {"validation": data.validation, "test": data.test}, eval_collate)
