"""The training loader (llmkit.data.loaders): a row that fails to load is named with its index, on whichever rank
reads it."""

from __future__ import annotations

import pytest
from helpers import faulty_run


@pytest.mark.slow
def test_a_broken_training_row_is_named_even_on_another_rank(tmp_path, tiny_bert, tiny_data):
    # the length-grouped sampler deals row 5 to some rank in the first steps; only that rank fails
    out, _, proc = faulty_run(tmp_path, tiny_bert, tiny_data, 2, "row@5:1")
    errors = [line for line in proc.stderr.splitlines() if "llmkit: error" in line]
    assert errors, proc.stderr[-3000:]
    assert "reading training row 5 failed: ValueError: a broken row (injected)" in errors[0]
    assert not (out / "final").exists()
