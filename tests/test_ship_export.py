"""llmkit.ship.export without a run: what `output.verify_export: false` still checks before final/ is published."""

import pytest
import torch
from safetensors.torch import save_file

from llmkit.errors import LlmkitError
from llmkit.ship.export import _weights_only


def test_an_unverified_export_is_still_refused_when_a_tensor_is_empty_or_a_file_is_cut(tmp_path):
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(3)}, tmp_path / "model.safetensors")
    assert _weights_only(tmp_path) == {"reloaded": False, "why": "output.verify_export is false"}

    save_file({"w": torch.ones(2, 3), "b": torch.zeros(0)}, tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match=r"1 size-0 tensors \(e.g. b\); refusing to export .* stays in"):
        _weights_only(tmp_path)

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmkitError, match="the export: model.safetensors is cut short.* stays in"):
        _weights_only(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LlmkitError, match="holds no .safetensors weights; nothing to export"):
        _weights_only(tmp_path)
