"""`data.exclude_rows`: training rows left out, named by their row id (the row's place in the train split as read,
counted from 0 before any row is dropped or shuffled: llmkit.data.sources.ROW_ID_KEY, the id the data map and
`llmkit audit` give each suspect). Given as a list in the YAML, or a file: `.txt` (one id per line, `#` comments)
or `.jsonl` (each line's "row", as `llmkit audit` writes its suspects), so a reviewed suspects file is used as it is."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.errors import LlmkitError

KEY = "data.exclude_rows"


def read(setting: str | list[int] | None) -> set[int]:
    """The row ids the setting names (empty: none). A missing file or a line that is not an id is an error."""
    if setting is None:
        return set()
    if isinstance(setting, list):
        return {_id(v, f"{KEY}[{i}]") for i, v in enumerate(setting)}
    path = Path(setting).expanduser()
    if not path.is_file():
        raise LlmkitError(f"{KEY} '{setting}' is not a file: give a .txt of row ids (one per line) or the "
                          "suspects.jsonl `llmkit audit` wrote, or a list of ids in the YAML")
    ids = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip() if path.suffix != ".jsonl" else line.strip()
        if not line:
            continue
        where = f"{KEY} {path.name} line {number}"
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)["row"]
            except (ValueError, KeyError, TypeError):
                raise LlmkitError(f"{where} is not a JSON object with a \"row\" id: {line[:80]!r}") from None
        else:
            value = line
        ids.add(_id(value, where))
    return ids


def _id(value, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0 or str(number) != str(value).strip():
        raise LlmkitError(f"{where}: {value!r} is not a row id (a whole number from 0, the row's place in the "
                          "train split as read)")
    return number


def keep(ids: set[int], file_rows: list[int], split: str, rows_read: int) -> list[int]:
    """Positions in `file_rows` (the file row of each row still kept) whose row is not excluded. An id past the
    split's end is an error: the list was made for other data."""
    if not ids:
        return list(range(len(file_rows)))
    beyond = max(ids)
    if beyond >= rows_read:
        raise LlmkitError(f"{KEY} lists row {beyond}, but split '{split}' has {rows_read} rows (ids count from 0 in "
                          "the split's order as read): was the list made for other data?")
    return [i for i, row in enumerate(file_rows) if row not in ids]
