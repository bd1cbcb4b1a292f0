"""Why a local data file could not be read, named by file, line and fix. Called only after `datasets` failed:
its readers (pandas, pyarrow, json) raise a wrapped error that names neither the file nor the line, so each
file is checked again here with the standard library, cheaply and only on that path."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

CHUNK = 1 << 20
TEXT_KINDS = ("csv", "json", "text")


def _root(exc: BaseException) -> BaseException:
    seen = 0
    while (exc.__cause__ or exc.__context__) is not None and seen < 10:
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return exc


def _not_utf8(path: Path) -> str | None:
    """Where the file stops being UTF-8 (a BOM is fine), or None."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset, lines = 0, 1
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset + exc.start
                line = lines + chunk[:exc.start].count(b"\n")
                return (f"data file {path} is not UTF-8 text: byte {at} (line {line}) is {chunk[exc.start:exc.end]!r}. "
                        "Re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)")
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    return None


def _bad_json(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in "[{":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError:
            pass  # maybe JSON lines after all: one object per line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return (f"data file {path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}): "
                    f"{line[:120]!r}. Each line must hold one JSON object")
        if not isinstance(row, dict):
            return f"data file {path} line {number} holds a {type(row).__name__}, not a JSON object with named fields"
    return None


def _bad_csv(path: Path, delimiter: str) -> str | None:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = csv.reader(fh, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            return f"data file {path} is empty"
        count = 0
        for count, row in enumerate(rows, 1):
            if row and len(row) != len(header):
                return (f"data file {path} row {count} (line {rows.line_num}) has {len(row)} fields, the header has "
                        f"{len(header)} ({header}). Quote fields that hold the delimiter")
        if count == 0:
            return f"data file {path} has a header ({header}) but no rows"
    return None


def _bad_parquet(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        return f"data file {path} is not a readable parquet file: {str(exc).splitlines()[0]}"
    return None


def diagnose(kind: str, files: dict[str, str], exc: BaseException) -> str:
    """One message for a failed load of `files` (split -> path) with the `kind` builder."""
    for split, name in files.items():
        path = Path(name).expanduser()
        problem = _not_utf8(path) if kind in TEXT_KINDS else None
        if problem is None and kind == "json":
            problem = _bad_json(path)
        elif problem is None and kind == "csv":
            problem = _bad_csv(path, "\t" if path.suffix.lower() == ".tsv" else ",")
        elif problem is None and kind == "parquet":
            problem = _bad_parquet(path)
        if problem:
            return f"split '{split}': {problem}"
    root = _root(exc)
    named = {str(Path(p).expanduser()) for p in files.values()}
    if isinstance(root, OSError) and root.filename and str(root.filename) not in named:
        return (f"datasets could not use its cache or a temporary folder: {type(root).__name__}: {root}. Check "
                "HF_DATASETS_CACHE / HF_HOME (a writable folder with free space)")
    detail = str(root).splitlines()[0][:300] if str(root) else ""
    return (f"the data files {sorted(files.values())} could not be read as {kind}: {type(root).__name__}: {detail}. "
            "Check that each file is well-formed " + {"csv": "CSV (a header, equal field counts)",
                                                      "json": "JSON lines (one object per line)",
                                                      "parquet": "parquet", "text": "text"}.get(kind, kind))

