"""The model `llmkit check-numerics` trains, as a folder beside its verdict: the user's model with every dropout
probability of its config at 0 (the reference cannot draw the ranks' random masks, so a run with dropout would
differ by its masks alone), its files linked, not copied. For a model too large to train in fp32 in one process,
a truncated copy: its first N layers, every other shape the same (embeddings, heads, widths)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from llmkit import model as models
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.rundir.layout import MODEL_CONFIG

LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")  # bert / llama, qwen / gpt2 / t5 weight names
# per parameter, what the reference and its twin hold at once (llmkit.train.reference): the fp32 reference's weight,
# gradient and Adam moments (16), the float64 twin's (32), the run's initial and final weights and both replays'
# final ones (4 + 4 + 4 + 8), each step's weights before and update in float64, for both (32); measured on the demo's
# MiniLM (22.7M parameters): a 2.7 GB peak with the runtime
BYTES_PER_PARAMETER = 100


def source(cfg: ModelConfig) -> Path:
    """The model's local folder: a path, an asset, or a Hub id's snapshot (from the cache when offline)."""
    name = models.locate(cfg.name_or_path, "model.name_or_path")
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=cfg.revision))
    except Exception as exc:  # offline and not cached, a wrong id, no access: the Hub's own words, on one line
        raise LlmkitError(f"model.name_or_path '{cfg.name_or_path}': check-numerics needs its files and could not "
                          f"get them from the Hub ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None


def _no_dropout(config: dict) -> list[str]:
    """Every dropout probability of a config (nested ones too) set to 0; returns the keys it changed."""
    changed = []
    for key, value in config.items():
        if isinstance(value, dict):
            changed += [f"{key}.{k}" for k in _no_dropout(value)]
        elif ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and value:
            config[key] = 0.0
            changed.append(key)
    return changed


def layer_count(config: dict) -> tuple[str, int] | None:
    """(the key, the number) of a config's layer stack, when it names one."""
    for key in LAYER_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    return None


def _safetensors_shapes(folder: Path) -> dict[str, tuple[Path, int]]:
    """Each weight of the folder's safetensors files: (its file, its number of elements), from the headers."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                shapes[name] = (file, count)
    return shapes


def parameters_by_layer(folder: Path) -> tuple[int, dict[int, int]]:
    """(weights outside the layer stack, weights of each layer) from the safetensors headers."""
    outside, layers = 0, {}
    for name, (_, count) in _safetensors_shapes(folder).items():
        index = LAYER_INDEX.search(name)
        if index is None:
            outside += count
        else:
            layers[int(index.group(1))] = layers.get(int(index.group(1)), 0) + count
    return outside, layers


def layers_that_fit(folder: Path, budget: float) -> tuple[int, int] | None:
    """(layers to keep, layers there are) when the reference of the whole model needs more than `budget` bytes;
    None when it fits (or its weights say nothing: a model trained from scratch)."""
    outside, layers = parameters_by_layer(folder)
    per = BYTES_PER_PARAMETER
    if not layers or (outside + sum(layers.values())) * per <= budget:
        return None
    keep, used = 0, outside * per
    for index in sorted(layers):
        if used + layers[index] * per > budget:
            break
        keep, used = keep + 1, used + layers[index] * per
    if keep == 0:
        raise LlmkitError(f"even one layer of {folder} with its embeddings and heads needs more than "
                          f"{budget / 2**30:.1f} GiB for the reference; check on a machine with more memory")
    return keep, len(layers)


def prepare(cfg: ModelConfig, out: Path, layers: int | None) -> dict:
    """The checked model in `out`: dropout off, the first `layers` layers when given (fewer than the model has).
    Returns what was done, for the verdict."""
    folder = source(cfg)
    config = json.loads((folder / MODEL_CONFIG).read_text())
    done = {"from": str(folder), "folder": str(out), "dropout_off": _no_dropout(config), "truncated": False}
    counted = layer_count(config)
    if counted:
        done["layers"] = counted[1]
    out.mkdir(parents=True)
    cut = layers is not None and counted is not None and layers < counted[1]
    if layers is not None and counted is None:
        raise LlmkitError(f"--layers: the config of {folder} names no layer count ({', '.join(LAYER_KEYS)})")
    if cut:
        _truncate(folder, out, config, counted, layers)
        done.update(truncated=True, layers=layers, of=counted[1])
    for path in folder.iterdir():  # the rest (tokenizer, generation config; the weights unless cut) linked
        if path.name != MODEL_CONFIG and not (cut and _is_weights(path)) and not path.name.startswith("."):
            os.symlink(path.resolve(), out / path.name)
    (out / MODEL_CONFIG).write_text(json.dumps(config, indent=2))
    return done


def _is_weights(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pt", ".gguf") or path.name.endswith(".index.json")


def _truncate(folder: Path, out: Path, config: dict, counted: tuple[str, int], keep: int) -> None:
    """The weights of layers 0..keep-1 and everything outside the layer stack, in one safetensors file; the
    config's layer count and its per-layer lists cut to match."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shapes = _safetensors_shapes(folder)
    if not shapes:
        raise LlmkitError(f"--layers cuts safetensors weights; {folder} has none (convert the model first)")
    kept = {}
    for name, (file, _) in shapes.items():
        index = LAYER_INDEX.search(name)
        if index is None or int(index.group(1)) < keep:
            with safe_open(str(file), "pt") as f:
                kept[name] = f.get_tensor(name)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    key, total = counted
    config[key] = keep
    for name, value in list(config.items()):  # per-layer settings (layer_types, sliding windows) cut too
        if isinstance(value, list) and len(value) == total and name != "architectures":
            config[name] = value[:keep]
