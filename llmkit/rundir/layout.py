"""The map of a run's folder: the name of every file and folder a run leaves, and how its records are read and
written. No other module spells these names; they ask a `RunDir` (the output dir) or an `Export` (its final/).

Records are written durably (a temporary file, fsync, rename: a crash leaves the old file or the new one). The
line files (metrics.jsonl, predictions_<split>.jsonl, samples.jsonl) are appended to; their reader skips a torn
last line, which a run killed mid-write leaves, and names a damaged line before it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmkit import fresh
from llmkit.errors import LlmkitError

CONFIG = "training_config.yaml"  # the resolved config (in the run dir and in final/)
METRICS = "metrics.json"  # the final results (in the run dir and in final/)
DS_CONFIG = "ds_config.json"  # the DeepSpeed config the run used (in the run dir and in final/)
PROBE = "llmkit_probe.json"  # in final/: inputs and the run's own logits, to check the export again later
REPORT_KINDS = ("html", "md", "json")  # report.<kind> of a run or eval, compare.<kind> of a comparison
PREDICTIONS = "predictions_{split}.jsonl"
MODEL_CONFIG = "config.json"  # transformers': a model's folder (in final/, merged/, a quantized copy)
ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA adapter's folder
ADAPTER, MERGED = "adapter", "merged"  # in final/ of a LoRA run (also the subfolders of a pushed repo)
FINAL = "final"
COMPARE = "compare.{kind}"  # `llmkit compare`'s pages
QUANTIZED = "quantized.json"  # in each quantized copy's folder: what the copy costs on the task
DYNAMICS = "training_dynamics.npy"  # each training row's scores per epoch (rundir.dynamics); a checkpoint has a copy


@dataclass(frozen=True)
class Export:
    """A run's export folder (final/): the model as transformers / peft save it, plus llmkit's records."""
    root: Path

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    ds_config = property(lambda self: self.root / DS_CONFIG)
    probe = property(lambda self: self.root / PROBE)
    adapter = property(lambda self: self.root / ADAPTER)  # LoRA runs: the adapter (with a classifier's head)
    merged = property(lambda self: self.root / MERGED)  # LoRA causal LMs: the adapter merged into its base

    def read_config(self) -> dict:
        return read_yaml(self.config)

    def read_metrics(self) -> dict:
        return read_json(self.metrics)

    def quantized(self, fmt: str) -> Path:
        """The folder of a quantized copy, beside the export (final/ -> final-onnx-int8/); written as <it>.tmp,
        the previous copy kept as <it>.old until the swap."""
        return self.root.parent / f"{self.root.name}-{fmt}"


@dataclass(frozen=True)
class RunDir:
    """A run's output dir. What it holds, by who writes it:

    - the run's life (llmkit.rundir.life): the marker, the lock, .previous/ of an overwritten run;
    - the records written when training starts: the resolved config, run_info.json, the DeepSpeed config;
    - training: metrics.jsonl (scalars), samples.jsonl (causal LM completions), checkpoints/, the trackers'
      folders, profile/, tokenizer/ (one trained from the data), training_dynamics.npy (classifiers);
    - after training: predictions_<split>.jsonl, metrics.json, final/ (written as final.tmp, the old one kept
      as final.old until the swap), explanations.json, data_map.json, report.{html,md,json};
    - `llmkit push`: hub_upload/ (a dry run's folder), the list of dry runs, .hub-* staging folders."""
    root: Path

    marker = property(lambda self: self.root / ".llmkit-run")
    lock = property(lambda self: self.root / ".llmkit.lock")
    previous = property(lambda self: self.root / ".previous")
    config = property(lambda self: self.root / CONFIG)
    run_info = property(lambda self: self.root / "run_info.json")
    ds_config = property(lambda self: self.root / DS_CONFIG)
    scalars = property(lambda self: self.root / "metrics.jsonl")
    samples = property(lambda self: self.root / "samples.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    tensorboard = property(lambda self: self.root / "runs")
    wandb = property(lambda self: self.root / "wandb")
    profile = property(lambda self: self.root / "profile")
    tokenizer = property(lambda self: self.root / "tokenizer")
    metrics = property(lambda self: self.root / METRICS)
    final_tmp = property(lambda self: self.root / f"{FINAL}.tmp")
    final_old = property(lambda self: self.root / f"{FINAL}.old")
    explanations = property(lambda self: self.root / "explanations.json")
    dynamics = property(lambda self: self.root / DYNAMICS)
    data_map = property(lambda self: self.root / "data_map.json")  # the data map's numbers and suspects' texts
    eval_marker = property(lambda self: self.root / ".llmkit-eval")  # `llmkit eval`'s output folder, not a run
    hub_upload = property(lambda self: self.root / "hub_upload")
    hub_snapshots = property(lambda self: self.root / ".hub-snapshots")  # every_save uploads' snapshots
    hub_staged = property(lambda self: self.root / ".llmkit-dry-runs.json")  # the dry-run folders made
    HUB_STAGING_PREFIX = ".hub-"  # a push's temporary staging folders

    @classmethod
    def of(cls, output_dir: str | Path) -> RunDir:
        """The run folder output.output_dir names, resolved once, the one way: from the working directory, ~
        expanded, symlinks kept (fresh.absolute: the run hands it to fresh processes, and the user's names stay in
        the logs). The preflight resolves it; every later stage is handed this object."""
        return cls(fresh.absolute(output_dir))

    @property
    def final(self) -> Export:
        return Export(self.root / FINAL)

    def report(self, kind: str) -> Path:
        """report.html, report.md or report.json."""
        return self.root / f"report.{kind}"

    def reports(self) -> dict[str, Path]:
        """Every report file, by kind."""
        return {kind: self.report(kind) for kind in REPORT_KINDS}

    def predictions(self, split: str) -> Path:
        return self.root / PREDICTIONS.format(split=split)

    def prediction_splits(self) -> list[str]:
        """The splits with a predictions file, sorted."""
        head, tail = PREDICTIONS.split("{split}")
        return sorted(p.name[len(head):-len(tail)] for p in self.root.glob(PREDICTIONS.format(split="*")))

    def owned(self) -> list[Path]:
        """The entries of the folder that an llmkit run writes (an overwrite moves exactly these aside)."""
        named = [self.checkpoints, self.final.root, self.final_tmp, self.final_old, self.tensorboard, self.wandb,
                 self.profile, self.tokenizer, self.hub_upload, self.hub_snapshots, self.hub_staged, self.metrics,
                 self.scalars, self.samples, self.config, self.run_info, self.ds_config, self.explanations,
                 self.dynamics, self.data_map, *(self.report(kind) for kind in REPORT_KINDS)]
        found = {p for p in named if p.exists() or p.is_symlink()}
        found.update(self.root.glob(PREDICTIONS.format(split="*")))
        found.update(self.root.glob(self.HUB_STAGING_PREFIX + "*"))
        return sorted(found)

    # ----------------------------------------------------------------------------------------- records

    def read_config(self) -> dict:
        return read_yaml(self.config)

    def read_metrics(self) -> dict:
        return read_json(self.metrics)

    def read_run_info(self) -> dict:
        return read_json(self.run_info)

    def write_records(self, config_yaml: str, run_info: dict, ds_config: dict | None) -> None:
        write_durably(self.config, config_yaml)
        write_durably(self.run_info, json.dumps(run_info, indent=2) + "\n")
        if ds_config:
            write_durably(self.ds_config, json.dumps(ds_config, indent=2) + "\n")

    def append_scalars(self, row: dict) -> None:
        with open(self.scalars, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def checkpoint_name(step: int | str) -> str:
    """A checkpoint's folder under checkpoints/ (written as .tmp-<it> until every rank has saved); a str step
    makes a pattern ("*", a regular expression)."""
    return f"step-{step}"


def read_json(path: Path) -> dict:
    """A JSON record, or {} when the file is not there."""
    return json.loads(path.read_text()) if path.is_file() else {}


def read_yaml(path: Path) -> dict:
    """A YAML record, or {} when the file is not there."""
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The rows of a run's line file and how many torn last lines were skipped (0 or 1). A bad line before the
    last is damage, not a torn write: an error naming the file and line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return rows, 1
            raise LlmkitError(f"{path} line {i + 1} is not JSON (damaged); restore the file or delete that line") \
                from None
    return rows, 0


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` so that it counts only once it is on disk: a temporary file, fsync, rename, and an
    fsync of the folder (a crash leaves the old file or the new one, never a torn one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
