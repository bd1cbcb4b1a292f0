"""Classification examples: every split the config names, tokenized (cached by `datasets`), evaluation splits in
length order."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from llmkit.config import DataConfig
from llmkit.data.packing import by_length
from llmkit.data.sources import ROW_ID_KEY, load_labeled


@dataclass
class ClassificationData:
    train: Dataset  # tokenized: input_ids, attention_mask, (token_type_ids), labels, row_ids (each row's identity)
    validation: Dataset  # tokenized, sorted by length, with "row" = index into rows["validation"]
    test: Dataset | None
    rows: dict[str, Dataset]  # cleaned text + label ids: validation / test for prediction files, train (with row
    # ids) for the texts of the data map's suspects
    label_names: list[str]
    train_lengths: list[int]


def prepare(cfg: DataConfig, tokenizer, seed: int, log=print) -> ClassificationData:
    """Load, check, clean, label-map and tokenize every split the config names."""
    labeled = load_labeled(cfg, seed, log)

    def tokenize(batch):
        pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        enc = tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    tokenized = {}
    for role, ds in labeled.rows.items():
        drop = [c for c in ds.column_names if c not in ("labels", ROW_ID_KEY)]
        tok = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=drop, desc=f"tokenizing {role}")
        if role != "train":
            # evaluation in length order wastes little padding; "row" maps predictions back to texts
            tok = by_length(tok.add_column("row", list(range(len(tok)))))
        tokenized[role] = tok
        cut = sum(1 for n in tok["length"] if n >= cfg.max_length)
        if cut:  # truncation is right for long texts, but the user should know how much is cut
            log(f"data: {cut} of {len(tok)} {role} rows reach data.max_length {cfg.max_length} tokens and are cut "
                "there; raise data.max_length (up to the model's positions) to keep more of each text")
    lengths = tokenized["train"]["length"]
    return ClassificationData(
        train=tokenized["train"].remove_columns("length"),
        validation=tokenized["validation"].remove_columns("length"),
        test=tokenized["test"].remove_columns("length") if "test" in tokenized else None,
        rows=labeled.rows,
        label_names=labeled.label_names,
        train_lengths=list(lengths),
    )
