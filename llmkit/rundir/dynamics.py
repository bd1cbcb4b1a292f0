"""The training-dynamics file (layout.DYNAMICS): one record per training row per epoch, written by rank 0 as the
run goes (llmkit.train.dynamics) and read by the data map (llmkit.evals.datamap).

It is a plain NumPy .npy file of a structured array (`np.load` reads it), 32 bytes a record: 32 MB per million
rows per epoch (JSON lines would take about 90). It grows in place: the records are appended and synced, then
the header's row count is rewritten; the header is the commit, so a crash between the two leaves the file as it
was (a tail past the count is dropped by the next append). NumPy pads the header for its count to grow in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from llmkit.errors import LlmkitError
from llmkit.rundir.layout import fsync_dir

RECORD = np.dtype([
    ("row", "<i8"),  # the row's id: its row in the train split as read (llmkit.data.sources.ROW_ID_KEY)
    ("epoch", "<i4"),  # the epoch it was trained in (0-based)
    ("step", "<i4"),  # the optimizer step of that micro-batch (1-based)
    ("label", "<i4"),  # its given label's id
    ("predicted", "<i4"),  # the label the model scored highest in that forward
    ("gold_prob", "<f4"),  # the probability of its given label (softmax of the forward's scores)
    ("margin", "<f4"),  # the given label's score less the largest other one (Pleiss et al. 2020)
])


def _header(n: int) -> dict:
    return {"descr": npy.dtype_to_descr(RECORD), "fortran_order": False, "shape": (n,)}


def _count(fh) -> tuple[int, int]:
    """(records the header commits, where the records start) of an open file."""
    version = npy.read_magic(fh)
    shape, _, dtype = npy.read_array_header_1_0(fh) if version == (1, 0) else npy.read_array_header_2_0(fh)
    if dtype != RECORD or len(shape) != 1:
        raise LlmkitError(f"{fh.name} is not a training-dynamics file of this llmkit (records {dtype}); move it away "
                          "or resume from a checkpoint of this llmkit")
    return shape[0], fh.tell()


def append(path: Path, records: np.ndarray) -> None:
    """Add `records` (RECORD) at the end of the file, made empty first if there is none."""
    if not path.is_file():
        write(path, np.empty(0, RECORD))
    if not len(records):
        return
    with open(path, "r+b") as fh:
        n, start = _count(fh)
        fh.seek(start + n * RECORD.itemsize)
        fh.truncate()  # an uncommitted tail (a crash before its header) goes
        fh.write(np.ascontiguousarray(records, RECORD).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(0)
        npy.write_array_header_1_0(fh, _header(n + len(records)))
        if fh.tell() != start:  # cannot happen with NumPy's growth padding; never leave a broken header
            raise LlmkitError(f"{path}: the header of the training dynamics changed size; delete the file to restart")
        fh.flush()
        os.fsync(fh.fileno())


def read(path: Path) -> np.ndarray:
    """Every committed record (none when the file is not there)."""
    if not path.is_file():
        return np.empty(0, RECORD)
    with open(path, "rb") as fh:
        n, start = _count(fh)
    return np.fromfile(path, dtype=RECORD, count=n, offset=start)


def write(path: Path, records: np.ndarray) -> None:
    """The file holding exactly `records`, written durably (a temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        npy.write_array_header_1_0(fh, _header(len(records)))
        fh.write(np.ascontiguousarray(records, RECORD).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy(source: Path, target: Path) -> None:
    """A durable copy of the committed records (into a checkpoint, or back from one on resume)."""
    if source.resolve() == target.resolve():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    with open(tmp, "r+b") as fh:
        n, start = _count(fh)
        fh.truncate(start + n * RECORD.itemsize)
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
