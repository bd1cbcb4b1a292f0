"""Data sources: a Hub or local dataset, or an asset, read into splits; columns checked, rows cleaned, labels mapped
to ids. The split roles are train, validation (config key data.validation_split) and test."""

from __future__ import annotations

import glob
import hashlib
import html
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, IterableDatasetDict, Value

from llmkit import assets
from llmkit.config import DataConfig
from llmkit.data import excluded, files_problem, label_balance
from llmkit.errors import LlmkitError

# a training row's identity: its row in the train split as read (before rows are dropped and shuffled), carried
# through the collator to the training dynamics (llmkit.train.dynamics), never to the model
ROW_ID_KEY = "row_ids"

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _builder(path: str, key: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise LlmkitError(f"{key} '{path}' has an unsupported extension; use one of {', '.join(BUILDERS)}")
    return BUILDERS[suffix]


SHARD = re.compile(r"^(?P<split>\w+)-\d+-of-\d+$")  # the Hub's shard names: train-00000-of-00004.parquet


def _load_files(files: dict[str, str | list[str]], key: str, streaming: bool = False) -> DatasetDict:
    """Split -> one file, or a split's shards (read in order; a stream reads them as its shards)."""
    lists = {split: [p] if isinstance(p, str) else list(p) for split, p in files.items()}
    for split, paths in lists.items():
        for path in paths:
            file = Path(path).expanduser()
            if file.is_dir():
                raise LlmkitError(f"{key}: the file for split '{split}' is a folder: {path}. Name one file per "
                                  "split, or point data.dataset at the folder")
            if not file.is_file():
                raise LlmkitError(f"{key}: the file for split '{split}' does not exist: {path}")
            with open(file, "rb") as fh:  # datasets fails on an empty file with a bare StopIteration
                if not fh.read(4096).strip():
                    raise LlmkitError(f"split '{split}' is empty: {path} holds no rows")
    every = [p for paths in lists.values() for p in paths]
    kinds = {_builder(p, key) for p in every}
    if len(kinds) > 1:
        raise LlmkitError(f"{key}: all split files must have one format, got {sorted(kinds)}")
    kind = kinds.pop()
    kwargs = {"delimiter": "\t"} if all(p.endswith(".tsv") for p in every) else {}
    # datasets reads data_files as glob patterns: a folder named "run[1]" must match itself
    patterns = {s: [glob.escape(str(Path(p).expanduser())) for p in paths] for s, paths in lists.items()}
    try:
        return datasets.load_dataset(kind, data_files=patterns, streaming=streaming, **kwargs)
    except Exception as exc:  # the readers (pandas, pyarrow, json) raise many types, wrapped by datasets
        named = {split if len(paths) == 1 else f"{split} ({Path(p).name})": p
                 for split, paths in lists.items() for p in paths}
        raise LlmkitError(files_problem.diagnose(kind, named, exc)) from None


def load_raw(cfg: DataConfig, streaming: bool = False) -> DatasetDict:
    """The splits of a Hub dataset, a local folder / file set, or an llmkit asset; `streaming`: read lazily, as
    IterableDatasets (nothing is converted to Arrow first)."""
    if cfg.data_files is not None:
        return _load_files(cfg.data_files, "data.data_files", streaming)
    source = assets.resolve(cfg.dataset)
    local = Path(source).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(local))
            return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in saved.items()}) if streaming else saved
        # a split file is named after a split the config reads; notes.txt, LICENSE or a Hub folder's README are not
        splits = {s for s in (cfg.train_split, cfg.validation_split, cfg.test_split) if s}
        files: dict[str, list[str]] = {}
        for p in sorted(local.iterdir()):
            shard = SHARD.match(p.stem)
            split = shard["split"] if shard else p.stem
            if p.suffix.lower() in BUILDERS and split in splits:
                files.setdefault(split, []).append(str(p))
        if not files:
            others = ", ".join(sorted(p.name for p in local.iterdir())[:6]) or "nothing"
            raise LlmkitError(f"data.dataset folder '{local}' holds no {'/'.join(BUILDERS)} file named after a split "
                              f"({', '.join(sorted(splits))}: <split>.<ext> or shards <split>-00000-of-00004.<ext>); "
                              f"it holds {others}")
        return _load_files(files, "data.dataset", streaming)
    if local.is_file():
        raise LlmkitError(f"data.dataset '{source}' is a single file; name one file per split with data.data_files")
    if source.startswith((".", "/", "~")):
        raise LlmkitError(f"data.dataset '{source}' does not exist")
    try:
        return datasets.load_dataset(source, cfg.dataset_config, streaming=streaming)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise LlmkitError(f"could not load data.dataset '{source}' from the Hub: {exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}. Check the id and network, or use local "
                          "files (data.data_files).") from None


_TAG = re.compile(r"<[^>]+>")
_URL = re.compile(r"(?:https?://|www\.)\S+")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Unicode NFKC, HTML entities/tags and URLs removed, whitespace squeezed."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = _URL.sub(" ", _TAG.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def _normalise_labels(values: list, split: str) -> list:
    """Labels as ints or strings, None where there is none. A CSV column with a blank or 'nan' label becomes
    float (NaN there, 1.0 elsewhere): NaN is no label, whole floats are class ids, anything else is an error."""
    out = []
    for row, value in enumerate(values):
        if isinstance(value, float):
            if math.isnan(value):
                value = None
            elif value.is_integer():
                value = int(value)
            else:
                raise LlmkitError(f"split '{split}' row {row}: label {value} is not a class: labels must be whole "
                                  "numbers (class ids) or names")
        out.append(value)
    return out


def _label_names(cfg: DataConfig, train: Dataset, labels: list) -> list[str]:
    feature = train.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return list(cfg.label_names or feature.names)
    ints = {v for v in labels if isinstance(v, int) and not isinstance(v, bool)}
    words = {v for v in labels if isinstance(v, str)}
    digits = {w for w in words if w.strip().lstrip("-").isdigit()}
    if (ints and words) or (digits and digits != words):
        number = next(iter(sorted(map(str, ints)) or sorted(digits)))
        word = next(iter(sorted(words - digits)))
        raise LlmkitError(f"column '{cfg.label_column}' of the train split mixes class ids (e.g. {number}) and "
                          f"label names (e.g. '{word}'); use one kind for every row")
    if cfg.label_names:
        return list(cfg.label_names)
    if words and not ints:
        return sorted(words)
    if ints and len(ints) == len({v for v in labels if v is not None}):
        if min(ints) < 0:
            raise LlmkitError(f"column '{cfg.label_column}' of the train split has negative labels {min(ints)}; "
                              "unlabeled rows cannot be trained on")
        return [str(i) for i in range(max(ints) + 1)]
    raise LlmkitError(f"column '{cfg.label_column}' must hold int or string labels, got "
                      f"{sorted({type(v).__name__ for v in labels})}")


def _to_ids(labels: list, names: list[str], split: str, rows: list[int]) -> list[int]:
    """String labels mapped to ids, int labels checked in range. Errors name the split and the row in the file
    (`rows`: the file row of each kept row)."""
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for value, row in zip(labels, rows):
        if isinstance(value, str):
            if value not in index:
                raise LlmkitError(f"split '{split}' row {row}: label '{value}' is not one of {names}; add it to "
                                  "data.label_names or fix the row")
            ids.append(index[value])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            ids.append(value)
        else:
            raise LlmkitError(f"split '{split}' row {row}: label {value!r} is out of range for "
                              f"{len(names)} classes {names}")
    return ids


def wanted_splits(cfg: DataConfig, raw: DatasetDict) -> dict[str, str]:
    """role (train / validation / test) -> split name, each checked to exist."""
    wanted = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
    for role, split in wanted.items():
        if split is not None and split not in raw:
            key = {"train": "data.train_split", "validation": "data.validation_split", "test": "data.test_split"}[role]
            hint = " (set it to null to skip testing)" if role == "test" else ""
            raise LlmkitError(f"{key} names split '{split}', but the dataset only has {sorted(raw)}{hint}")
    return {role: split for role, split in wanted.items() if split is not None}


COLUMN_KEYS = "the data.*_column keys"
COLUMN_FLAGS = "--text-column / --text-pair-column / --label-column"  # what a command that scores rows takes


def require_columns(ds: Dataset, split: str, columns: list[str], where: str = COLUMN_KEYS) -> None:
    """A clear error for the first configured column the split lacks; `where` names what sets the columns."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        joined = next((sep for sep in (";", "\t", "|") if len(ds.column_names) == 1 and sep in ds.column_names[0]),
                      None)
        hint = (f"; the file looks separated by {joined!r}, not commas: save it as a comma-separated .csv (or "
                "tab-separated .tsv)") if joined else ""
        raise LlmkitError(f"split '{split}' has no column {missing[0]!r} (columns: {ds.column_names}); set "
                          f"{where} to the right names{hint}")


def one_split(source: str, split: str, label_names: list[str], text_column: str, text_pair_column: str | None,
                label_column: str, max_length: int, max_samples: int | None) -> DataConfig:
    """A DataConfig reading one split from a Hub id / folder / asset, or from a single file."""
    path = Path(source).expanduser()
    files = {split: str(path)} if path.is_file() else None
    return DataConfig(dataset=None if files else source, data_files=files, train_split=split, validation_split=split,
                      test_split=None, text_column=text_column, text_pair_column=text_pair_column,
                      label_column=label_column, label_names=label_names, max_length=max_length,
                      max_eval_samples=max_samples)


def check_splits(source: str, splits: list[str]) -> None:
    """Every split asked for is in the data, said before any model is loaded (a single file is whatever split it
    is named)."""
    if Path(source).expanduser().is_file():
        return
    for split in splits:
        try:
            have = sorted(load_raw(one_split(source, split, [], "text", None, "label", 2, None)))
        except LlmkitError as exc:
            raise LlmkitError(f"--split {split}: {exc}") from None
        if split not in have:
            raise LlmkitError(f"--split {split}: the data {source} has only the splits {have}")


@dataclass
class LabeledSplits:
    rows: dict[str, Dataset]  # role (train / validation / test) -> cleaned text columns + "labels" ids
    label_names: list[str]
    dropped_rows: dict[str, int]


def load_labeled(cfg: DataConfig, seed: int, log=print, training: bool = True,
                 keep: tuple[str, ...] = (), match=None) -> LabeledSplits:
    """Load and check every split the config names: rows with text, cleaned if asked, labels mapped to ids.
    `training`: the train split is trained on, so every label needs rows there (not so for `llmkit eval`).
    `keep`: more columns carried along untouched (`llmkit compare --slice-by`).
    `match(values, feature, split)`: a trained model's labels given as cfg.label_names, each split's labels turned
    into those names first (data.scored), so that no id is read as a model's label by its position alone."""
    raw = load_raw(cfg)
    wanted = wanted_splits(cfg, raw)
    columns = list(dict.fromkeys(c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, *keep) if c))
    texts = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    splits: dict[str, Dataset] = {}
    labels: dict[str, list] = {}
    kept: dict[str, list[int]] = {}  # per role: the file row of each kept row, for messages
    dropped: dict[str, int] = {}
    for role, split in wanted.items():
        ds = raw[split]
        require_columns(ds, split, columns, COLUMN_KEYS if match is None else COLUMN_FLAGS)
        ds = ds.select_columns(columns)
        if len(ds) == 0:
            raise LlmkitError(f"split '{split}' is empty: it has no rows at all")
        for c in texts:  # a CSV column of texts like "12" is read as numbers
            kind = getattr(ds.features[c], "dtype", None)
            if kind is None or kind in ("list", "struct"):
                raise LlmkitError(f"column '{c}' of split '{split}' holds {type(ds.features[c]).__name__} values, "
                                  "not text: each row's text must be one string")
            if kind not in ("string", "large_string"):
                ds = ds.cast_column(c, Value("string"))
        values = _normalise_labels(ds[cfg.label_column], split)
        if match is not None:
            values = match(values, ds.features[cfg.label_column], split)
        text_values = [ds[c] for c in texts]
        bad = [i for i, v in enumerate(values)
               if v is None or not all(isinstance(t[i], str) and t[i].strip() for t in text_values)]
        if bad and not cfg.drop_bad_rows:
            raise LlmkitError(f"split '{split}' row {bad[0]} has empty/missing text or no label: {ds[bad[0]]}. Fix "
                              "the row, or set data.drop_bad_rows: true to drop such rows with a count")
        dropped[split] = len(bad)
        if bad:
            log(f"data: dropped {len(bad)} rows of split '{split}' with empty text or no label")
            skip = set(bad)
            kept[role] = [i for i in range(len(ds)) if i not in skip]
            ds, values = ds.select(kept[role]), [values[i] for i in kept[role]]
        else:
            kept[role] = list(range(len(ds)))
        if role == "train" and training and cfg.exclude_rows is not None:
            ds, values, kept[role] = _exclude(cfg, ds, values, kept[role], split, len(raw[split]), log)
        if len(ds) == 0:
            raise LlmkitError(f"split '{split}' has no usable rows (all {len(bad)} empty or unlabeled)")
        if cfg.clean_text:
            ds = ds.map(lambda r: {c: clean(r[c]) for c in texts}, desc=f"cleaning {split}")
        splits[role], labels[role] = ds, values
    names = _label_names(cfg, splits["train"], labels["train"])
    if len(names) < 2:
        raise LlmkitError(f"the train split has only the label(s) {names}; a classifier needs at least 2")
    for role, split in wanted.items():
        ids = _to_ids(labels[role], names, split, kept[role])
        if role == "train" and training:
            label_balance.check_balance(ids, names, log)
        ds = splits[role].remove_columns(cfg.label_column).add_column("labels", ids)
        limit = cfg.max_train_samples if role == "train" else cfg.max_eval_samples
        if role == "train":
            if training:  # numbered before the shuffle: the id names the row in the file, whatever the order
                ds = ds.add_column(ROW_ID_KEY, kept[role])
            ds = ds.shuffle(seed=seed)
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        splits[role] = ds
    return LabeledSplits(rows=splits, label_names=names, dropped_rows=dropped)


def _exclude(cfg: DataConfig, ds: Dataset, values: list, rows: list[int], split: str, rows_read: int, log):
    """The train split without the rows data.exclude_rows names (llmkit.data.excluded)."""
    ids = excluded.read(cfg.exclude_rows)
    at = excluded.keep(ids, rows, split, rows_read)
    if len(at) < len(rows):
        log(f"data: excluded {len(rows) - len(at)} rows of split '{split}' listed in data.exclude_rows")
        ds, values, rows = ds.select(at), [values[i] for i in at], [rows[i] for i in at]
    return ds, values, rows


def digest(ds: Dataset) -> str:
    """sha256 of a dataset's content in row order (each column hashed as one stream, so Arrow's chunking does not
    matter): what a resumed run compares to know it sees the same rows, wherever the files now live."""
    import numpy as np
    import pyarrow as pa

    # the row ids follow from the rows and the seed: left out, so digests from before them still match
    hashes = {name: hashlib.sha256() for name in sorted(ds.column_names) if name != ROW_ID_KEY}
    for table in ds.with_format("arrow").iter(batch_size=100_000):
        for name, h in hashes.items():
            column = table.column(name).combine_chunks()
            while isinstance(column, (pa.ListArray, pa.LargeListArray)):
                h.update(np.diff(column.offsets.to_numpy()).astype(np.int64).tobytes())  # row lengths
                column = column.flatten()
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                h.update("\0".join(column.to_pylist()).encode())
            else:
                h.update(column.to_numpy(zero_copy_only=False).tobytes())
    return hashlib.sha256("".join(f"{n}:{h.hexdigest()}" for n, h in hashes.items()).encode()).hexdigest()
