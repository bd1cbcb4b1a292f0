"""Experiment trackers for real, offline: a 2-rank run reports to TensorBoard, MLflow (local file store), Weights &
Biases (offline) and Trackio (local), and each one's own reader finds the per-step train loss of metrics.jsonl,
the hyperparameters, the run name and tags, and the sample generations as text."""

from __future__ import annotations

import json
import struct

import pytest
from helpers import changed
from lm_runs import RUN_NAME, TAGS

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.launch import trackers


def _wandb_records(path):
    """The records of W&B's offline transaction log (run-<id>.wandb): a 7-byte header, then LevelDB-style
    records (checksum, length, kind) in 32 KiB blocks, each a wandb_internal Record protobuf. wandb itself reads
    it back only in Go (`wandb sync`), so this is the Python side of that format."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32 * 1024
    assert raw[:4] == b":W&B", raw[:7]
    pos, data = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if (length, kind) == (0, 0):
            break
        data += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(data)
            data = b""
            yield record


@pytest.mark.slow
def test_four_trackers_get_what_metrics_jsonl_has(lm_mixture_run, monkeypatch):
    """The shared 2-rank causal-LM run (conftest.lm_mixture_run) reported to all four."""
    proc, out, env, root = lm_mixture_run.proc, lm_mixture_run.out, lm_mixture_run.env, lm_mixture_run.root
    assert "check: trackers: tensorboard, mlflow, wandb, trackio" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert len(loss) >= 4
    lr = json.loads((out / "training_config.yaml").read_text().split("learning_rate: ")[1].split("\n")[0])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    last_sample = samples[-1]["samples"][0]["completion"]

    # TensorBoard: the event files under <output_dir>/runs (float32 scalars), the hyperparameters beside them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(loss, rel=1e-6)
    text = events.Tensors("samples/0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert last_sample in text
    hparams = "".join(p.read_text() for p in (out / "runs").glob("*/hparams.yml"))
    assert "train.learning_rate: " in hparams and "run.world_size: 2" in hparams

    # MLflow: its client on the file store
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store too
    client = MlflowClient(f"file:{root / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("llmkit").experiment_id])
    assert run.info.run_name == RUN_NAME and {"sentiment", "tiny"} <= set(run.data.tags)
    assert float(run.data.params["train.learning_rate"]) == lr and run.data.params["run.world_size"] == "2"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(loss, rel=1e-12)
    texts = [a.path for a in client.list_artifacts(run.info.run_id, "samples/0")]
    assert texts and all(p.endswith(".md") for p in texts)

    # Weights & Biases: the offline run's transaction log
    [log] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, names = {}, {}, []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
            if "samples/0" in items:
                assert last_sample in items["samples/0"] or items["_step"] < samples[-1]["step"]
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            names.append((record.run.display_name, list(record.run.tags), record.run.project))
    assert history == pytest.approx(loss, rel=1e-12)
    assert config["train.learning_rate"] == lr and config["run.world_size"] == 2
    assert (RUN_NAME, TAGS, "llmkit") in names

    # Trackio: its local store
    monkeypatch.setenv("TRACKIO_DIR", env["TRACKIO_DIR"])
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("llmkit", RUN_NAME)
    assert {r["step"]: r["train/loss"] for r in logs if "train/loss" in r} == pytest.approx(loss, rel=1e-12)
    assert SQLiteStorage.get_run_config("llmkit", RUN_NAME)["train.learning_rate"] == lr


def test_trackers_are_checked_before_training(monkeypatch, tmp_path):
    cfg = Config()
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login
    for name in ("WANDB_MODE", "WANDB_API_KEY", "COMET_API_KEY", "COMET_MODE"):
        monkeypatch.delenv(name, raising=False)
    cfg = changed(cfg, {"train.report_to": "none"})
    assert trackers.check(cfg) == "trackers: none (train.report_to: none)" and trackers.names(cfg) == []
    cfg = changed(cfg, {"train.report_to": ["tensorboard", "wandb"]})
    with pytest.raises(LlmkitError, match="has wandb, but no W&B credentials: run `wandb login`, set WANDB_API_KEY"):
        trackers.check(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.check(cfg) == "trackers: tensorboard, wandb"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.delenv("WANDB_MODE")
    assert trackers.check(cfg) == "trackers: tensorboard, wandb"  # `wandb login` wrote the key there
    cfg = changed(cfg, {"train.report_to": ["tensorbord"]})
    with pytest.raises(LlmkitError, match="unknown tracker 'tensorbord'; choose from tensorboard, wandb"):
        trackers.check(cfg)
    cfg = changed(cfg, {"train.report_to": ["aim"]})  # not installed here
    with pytest.raises(LlmkitError, match="the aim package is not installed: pip install aim"):
        trackers.check(cfg)
    cfg = changed(cfg, {"train.report_to": ["mlflow", "mlflow"]})
    with pytest.raises(LlmkitError, match="names a tracker twice"):
        trackers.check(cfg)
    flat = trackers.hyperparameters(cfg, world_size=2)
    assert flat["train.report_to"] == '["mlflow", "mlflow"]' and flat["run.world_size"] == 2
    assert flat["checkpoint.resume_from"] == "null" and flat["train.learning_rate"] == cfg.train.learning_rate
