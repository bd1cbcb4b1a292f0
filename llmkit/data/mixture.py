"""Data mixtures (data.mixture): several sources, each read like a single data.dataset, interleaved by weight.

A weight is the share of training examples drawn from its source (rows for prompt/response and chat sources,
blocks for packed text): each example's source is drawn with probability weight / sum of weights, with
train.seed, by datasets' interleave_datasets. The mixture ends when a source runs out of examples
("first_exhausted"), so no example is seen twice in an epoch and the shares hold; a small source with a large
weight therefore shortens the epoch (the log says how many examples each source gave and had)."""

from __future__ import annotations

import dataclasses

import numpy as np
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets, interleave_datasets

from llmkit.config import DataConfig, MixtureSource
from llmkit.data.packing import column

SOURCE = "source"  # the column naming each example's source (an index into data.mixture)
ROW_FEATURES = Features({"input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8")),
                         "labels": Sequence(Value("int32")), "length": Value("int64"), SOURCE: Value("int16")})


def source_config(cfg: DataConfig, src: MixtureSource) -> DataConfig:
    """The data config of one source: data.* with the source's own keys over it, no test split."""
    own = {f.name: getattr(src, f.name) for f in dataclasses.fields(src)
           if f.name != "weight" and getattr(src, f.name) is not None}
    return dataclasses.replace(cfg, mixture=None, test_split=None, **own)


def name_of(src: MixtureSource) -> str:
    return src.dataset or ",".join(f"{k}={v}" for k, v in sorted((src.data_files or {}).items()))


def as_rows(ds: Dataset, index: int, block_size: int | None = None) -> Dataset:
    """One source's examples in the common row layout: ids, mask, labels, real length and the source index."""
    if "length" not in ds.column_names:  # packed blocks: all full but the last
        lengths = np.full(len(ds), block_size, dtype=np.int64)
        lengths[-1] = sum(ds[len(ds) - 1]["attention_mask"])
        ds = ds.add_column("length", lengths)
    keep = ["input_ids", "attention_mask", "labels", "length"]
    ds = ds.select_columns(keep).add_column(SOURCE, np.full(len(ds), index, dtype=np.int16))
    return ds.cast(ROW_FEATURES)


def mix(sources: list[MixtureSource], trains: list[Dataset], seed: int) -> tuple[Dataset, list[dict]]:
    """The interleaved train split and, per source, what it gave: examples, real tokens, the share drawn."""
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    mixed = interleave_datasets(trains, probabilities=(weights / weights.sum()).tolist(), seed=seed,
                                stopping_strategy="first_exhausted")
    source = column(mixed, SOURCE)
    drawn = np.bincount(source, minlength=len(sources))
    tokens = np.bincount(source, weights=column(mixed, "length"), minlength=len(sources))
    counts = [{"source": name_of(s), "weight": float(s.weight), "weight_share": float(w / weights.sum()),
               "examples": int(n), "drawn_share": float(n / max(1, drawn.sum())), "tokens": int(t),
               "available": len(ds)}
              for s, w, n, t, ds in zip(sources, weights, drawn, tokens, trains)]
    return mixed, counts


def validation(splits: list[Dataset | None]) -> Dataset | None:
    """The sources' validation rows, one after the other (sources without that split give none)."""
    present = [s for s in splits if s is not None]
    return concatenate_datasets(present) if present else None
