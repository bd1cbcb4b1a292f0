"""Packing plain text into fixed blocks at any scale: token ids stay in Arrow (memory-mapped, cached by datasets)
from tokenization to the training batch, so no rank holds the corpus in Python lists and a second run with the
same data and tokenizer reads the packed blocks from the cache.

The stream is every document followed by EOS, cut into blocks of `block_size` tokens: every token lands in
exactly one block, in order, and only the last block is short (padded, its padding out of attention and loss)."""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Sequence, Value

from llmkit.errors import LlmkitError

IGNORE = -100  # label of a token that does not count in the loss
BLOCKS_PER_BATCH = 1024  # blocks cut per map batch: bounds the memory of one batch, not of the corpus
VERSION = "1"  # part of the cache key: bump when the packed layout changes
FEATURES = Features({"input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8")),
                     "labels": Sequence(Value("int32"))})


@dataclass
class PackStats:
    documents: int
    tokens: int  # real tokens placed, EOS separators included
    blocks: int
    block_size: int

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots: 1.0 means no padding at all."""
        return self.tokens / max(1, self.blocks * self.block_size)


def ids_of(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, no special tokens added. A fast tokenizer set to neither truncate nor pad is asked
    through its backend's encode_batch_fast: the same ids as `tokenizer(texts)`, without the character offsets
    that transformers' call computes and drops (about 1.5x faster); any other tokenizer through the plain call."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def with_eos(ids: list[list[int]], eos_id: int) -> np.ndarray:
    """Documents' ids as one stream, each followed by EOS (int32, no per-token Python loop)."""
    n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return _joined(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(n.sum())), n + 1,
                   eos_id)


def _joined(values: np.ndarray, n: np.ndarray, eos_id: int) -> np.ndarray:
    """`values` (documents back to back) with EOS after each; `n` holds each document's length + 1."""
    out = np.empty(int(n.sum()), dtype=np.int32)
    eos_at = np.cumsum(n) - 1
    keep = np.ones(len(out), dtype=bool)
    keep[eos_at] = False
    out[keep] = values
    out[eos_at] = eos_id
    return out


def tokenize(ds: Dataset, tokenizer, column: str, desc: str) -> Dataset:
    """Each document's ids (int32) and its stream length `n` (ids + EOS), batched and cached by datasets."""
    def encode(batch):
        ids = ids_of(tokenizer, batch[column])
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(n, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        # handed to Arrow as a table: no per-token Python objects on the way to the cache file
        return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), "n": pa.array(n + 1)})

    features = Features({"ids": Sequence(Value("int32")), "n": Value("int64")})
    return ds.map(encode, batched=True, remove_columns=ds.column_names, features=features, desc=desc)


def _stream(docs: Dataset, first: int, stop: int, eos_id: int) -> np.ndarray:
    """Documents first..stop-1 as one stream, each followed by EOS, read from Arrow without Python lists."""
    ids = docs.data.table.slice(first, stop - first).column("ids").combine_chunks()
    values = ids.flatten().to_numpy(zero_copy_only=False)
    return _joined(values, np.diff(ids.offsets.to_numpy()) + 1, eos_id)


def blocks_of(stream: np.ndarray, block_size: int, pad_id: int) -> dict:
    """A token stream cut into rows of `block_size`: the last one padded, its padding out of attention and loss."""
    rows = -(-len(stream) // block_size)
    ids = np.full(rows * block_size, pad_id, dtype=np.int32)
    ids[:len(stream)] = stream
    mask = np.zeros(rows * block_size, dtype=np.int8)
    mask[:len(stream)] = 1
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    shape = (rows, block_size)
    return {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape), "labels": labels.reshape(shape)}


def pack_dataset(docs: Dataset, block_size: int, eos_id: int, pad_id: int, desc: str = "packing"
                 ) -> tuple[Dataset, PackStats]:
    """Blocks of the tokenized documents (`tokenize`'s output), written to an Arrow file beside the tokenized data
    (reused when the same data, block size and special ids come again)."""
    if block_size < 2:
        raise LlmkitError(f"the packing block size must be >= 2, got {block_size}")
    if docs.num_rows == 0:
        raise LlmkitError("there is no text to pack: every document is empty")
    ends = np.cumsum(docs.data.table.column("n").to_numpy())  # one int per document, the only Python-side array
    total = int(ends[-1])
    blocks = math.ceil(total / block_size)
    stats = PackStats(documents=docs.num_rows, tokens=total, blocks=blocks, block_size=block_size)

    def cut(batch):
        b0, b1 = batch["block"][0], batch["block"][-1] + 1
        t0, t1 = b0 * block_size, min(b1 * block_size, total)
        d0 = int(np.searchsorted(ends, t0, side="right"))
        d1 = int(np.searchsorted(ends, t1 - 1, side="right")) + 1
        before = int(ends[d0 - 1]) if d0 else 0
        return blocks_of(_stream(docs, d0, d1, eos_id)[t0 - before: t1 - before], block_size, pad_id)

    key = hashlib.sha256(f"{VERSION} {docs._fingerprint} {block_size} {eos_id} {pad_id}".encode()).hexdigest()[:16]
    index = Dataset.from_dict({"block": np.arange(blocks, dtype=np.int64)})
    # the index is in memory, so name the output file: datasets caches a map only when it knows where
    where = {"cache_file_name": str(Path(docs.cache_files[0]["filename"]).parent / f"llmkit-packed-{key}.arrow")} \
        if docs.cache_files else {}
    out = index.map(cut, batched=True, batch_size=BLOCKS_PER_BATCH, remove_columns=["block"], features=FEATURES,
                    new_fingerprint=key, desc=desc, **where)
    return out, stats


def pack(documents: list[list[int]], block_size: int, eos_id: int, pad_id: int) -> tuple[dict, PackStats]:
    """`pack_dataset` for documents already in memory (tests, small inputs): the same blocks as lists."""
    ds = Dataset.from_dict({"ids": documents, "n": [len(d) + 1 for d in documents]},
                           features=Features({"ids": Sequence(Value("int32")), "n": Value("int64")}))
    blocks, stats = pack_dataset(ds, block_size, eos_id, pad_id)
    return {k: [list(map(int, row)) for row in blocks[k]] for k in ("input_ids", "attention_mask", "labels")}, stats


def column(ds: Dataset, name: str) -> np.ndarray:
    """One numeric column as a numpy array, straight from Arrow (no pass over the rows in Python)."""
    col = ds.data.table.column(name)
    if ds._indices is not None:  # a select/shuffle view: take the rows it points at
        col = col.take(pa.chunked_array(ds._indices.column(0)))
    return col.to_numpy()


def by_length(ds: Dataset) -> Dataset:
    """`ds` in order of its "length" column, ties as they were: Dataset.sort's order, without the sort option
    pyarrow 25+ warns about at each call."""
    return ds.select(np.argsort(column(ds, "length"), kind="stable"))
