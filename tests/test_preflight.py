"""Preflight (llmkit.preflight): what it refuses and warns about before any process group starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.preflight import check_output_dir_is_safe, warnings


def test_unsafe_output_dirs_and_remote_code_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where, why in (("/", "the filesystem root"), (str(Path.home()), "your home directory"),
                       (str(tmp_path), "the working directory"), (str(tmp_path.parent), "the working directory")):
        cfg = load_config(None, ["--data.dataset", "x", "--output.output_dir", where])
        with pytest.raises(LlmkitError, match=why):
            check_output_dir_is_safe(cfg)
    cfg = load_config(None, ["--data.dataset", "x", "--model.trust_remote_code", "true", "--model.name_or_path",
                             "someone/model"])
    (line,) = warnings(cfg)
    assert "trust_remote_code is on: Python code from 'someone/model'" in line
    assert warnings(load_config(None, ["--data.dataset", "x"])) == []
