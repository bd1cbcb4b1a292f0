"""The run: every pre-training check, then the Accelerator (and the process group) and the run's own files.

`setup` is the first thing a recipe calls after parsing its config. The Run it returns carries what every later
stage needs: the config, the Accelerator, the precision and DeepSpeed config that were settled, the output dir."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from llmkit import logs, model
from llmkit.config import Config
from llmkit.data import lm, sources
from llmkit.data.streaming import Stream
from llmkit.errors import LlmkitError
from llmkit.launch import parallel, preflight, trackers
from llmkit.launch.precision import ACCELERATE_PRECISION
from llmkit.rundir import checkpoints, elastic, layout, life
from llmkit.train.guards import StopSignal

T = TypeVar("T")


@dataclass
class Run:
    """Everything set up before training: the config, the Accelerator and the resolved settings."""
    cfg: Config
    accelerator: Accelerator
    precision: str
    ds_config: dict | None
    dir: layout.RunDir  # output.output_dir, resolved once by the preflight: where each of the run's files goes
    data_identity: dict | None = None  # the training rows' digest and the labels: a resume must match them
    stop: StopSignal | None = None  # SIGTERM / SIGINT, caught for the whole run (setup to finish)
    resume: checkpoints.Resume | None = None  # the checkpoint this run continues (resolved by the preflight)
    tokenizer_from: str | None = None  # a tokenizer trained from the data (load_tokenizer) instead of the config's
    recipe: str = ""  # "classification" or "causal_lm": the recipe that set this run up
    live_estimate: float | None = None  # the preflight's "live at peak" per device (bytes), its runtime measured again

    @property
    def accumulation(self) -> int:
        """The gradient accumulation this run trains with: the config's, or the one an elastic resume keeps the
        global batch with (the config itself is never changed)."""
        return self.elastic.accumulation if self.elastic is not None else self.cfg.train.gradient_accumulation_steps

    @property
    def elastic(self) -> elastic.Elastic | None:
        """How a resume on another number of ranks (or with a new global batch) continues; None otherwise."""
        return self.resume.elastic if self.resume is not None else None

    @property
    def zero_stage(self) -> int | None:
        return parallel.zero_stage(self.ds_config)

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    def stopped(self) -> str | None:
        """The stop signal any rank got so far (every rank must ask together: it is one tiny collective)."""
        if self.stop is None or not self.stop.agreed(self.accelerator):
            return None
        return self.stop.name or "a signal on another rank"

    def finish(self, skipped: str | None = None) -> None:
        """The end of a recipe. A stop signal after the last training step let the evaluation, export and report
        finish (it stops the loop only while it runs); say so, and stop with the steps it made the run skip."""
        signal = self.stopped()
        self.accelerator.end_training()
        if torch.distributed.is_initialized():
            # every rank is done with collectives: shut the process group down now, not in interpreter teardown
            # (where a gloo rank once aborted with "terminate called without an active exception")
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()
        if signal and skipped:
            raise LlmkitError(f"stopped by {signal} after the last training step: final/ and the report in "
                              f"{self.dir.root} are complete and verified; {skipped}")
        if signal:
            self.log(f"{signal} arrived after the last training step; the run finished its export and report")

    def main_first(self, fn: Callable[[], T], others: bool = True) -> T | None:
        """`fn()` on rank 0 first (it fills the caches), then on the other ranks (unless `others` is False).
        A user error on rank 0 is sent to every rank and raised there too: each exits with the one message,
        where a plain barrier would leave the others failing in it with a connection traceback."""
        acc = self.accelerator
        result, message = None, [None]
        if acc.is_main_process:
            try:
                result = fn()
            except LlmkitError as exc:
                message = [str(exc)]
        if acc.num_processes > 1:
            broadcast_object_list(message)
        if message[0] is not None:
            raise LlmkitError(message[0], on_every_rank=True)
        if not acc.is_main_process and others:
            result = fn()
        return result

    def identify_data(self, train, label_names: list[str] | None) -> None:
        """Record what the run trains on (the tokenized train split's digest, the label set) for resume checks; a
        stream is named by its source and row format (reading it to hash it would read the whole stream)."""
        d = self.cfg.data
        digest = f"stream of {d.dataset or d.data_files} ({d.format})" if isinstance(train, Stream) \
            else sources.digest(train)
        self.data_identity = {"train": digest, "labels": label_names}

    def write_records(self, resumed_at: int | None) -> None:
        """The run's records (resolved config, what ran where, the DeepSpeed config), written once resume is
        resolved: a refused resume leaves the records of the run it refused to continue as they were. A resumed
        run logs again from the checkpoint's step, so the rows after it leave metrics.jsonl."""
        if not self.accelerator.is_main_process:
            return
        info = run_info(self.accelerator, self.precision, self.ds_config)
        # what this launch decided beside the config as given: the accumulation an elastic resume trains with,
        # a tokenizer trained from the data
        info["resolved"] = {"gradient_accumulation_steps": self.accumulation, "tokenizer": self.tokenizer_from}
        info["recipe"] = self.recipe
        self.dir.write_records(self.cfg.dump(), info, self.ds_config)
        if resumed_at is not None:
            dropped = life.trim_metrics(self.dir, resumed_at)
            if dropped:
                self.log(f"metrics.jsonl: {dropped} rows after step {resumed_at} dropped (they are logged again)")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """To the trackers (train.report_to) and to <output_dir>/metrics.jsonl (one JSON object per call)."""
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            self.dir.append_scalars({"step": step, **scalars})


def run_info(accelerator: Accelerator, precision: str, ds_config: dict | None) -> dict:
    """What ran where: for the report and the model card."""
    versions = {}
    for pkg in ("llmkit", "torch", "transformers", "accelerate", "deepspeed", "datasets", "evaluate", "peft"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:  # the llmkit checkout this ran from, when it is one
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": accelerator.num_processes,
        "device": device, "precision": precision, "zero_stage": parallel.zero_stage(ds_config),
        "versions": versions, "git_commit": commit, "python": platform.python_version(),
    }


def setup(cfg: Config, recipe: str) -> Run:
    """The pre-training checks of `recipe` (`llmkit validate`'s), then the Accelerator, the seed and the run's
    files."""
    logs.for_run()  # before DeepSpeed is imported: rank 0 says each library's warning once, the others errors only
    plan = preflight.check(cfg, parallel.world_size(), recipe)
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // local))
    # without gloo, Accelerate + DeepSpeed on CPU see world size 1 and DeepSpeed rejects the batch sizes; the
    # timeout reaches the default group (DeepSpeed reuses it) and the stop-flag group (guards.StopSignal)
    timeout = timedelta(minutes=cfg.train.collective_timeout_minutes)
    handlers = []
    if "LOCAL_RANK" in os.environ:  # a launcher's ranks; one plain process starts no process group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    plugin = DeepSpeedPlugin(hf_ds_config=plan.ds_config) if plan.ds_config is not None else None
    with logs.main_rank_stdout():  # DeepSpeed prints from each rank that it built its communication op
        accelerator = Accelerator(
            mixed_precision=ACCELERATE_PRECISION[plan.precision],
            deepspeed_plugin=plugin,
            gradient_accumulation_steps=plan.accumulation,
            step_scheduler_with_optimizer=False,  # the loop steps it once per optimizer step
            kwargs_handlers=handlers,
            log_with=trackers.log_with(cfg, plan.dir),
            project_dir=str(plan.dir.root),
        )
    set_seed(cfg.train.seed)
    if not accelerator.is_local_main_process:  # progress bars (tokenization, loading) on rank 0 only
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    accelerator.wait_for_everyone()  # every rank has checked output_dir before rank 0 writes into it
    run = Run(cfg, accelerator, plan.precision, plan.ds_config, plan.dir, resume=plan.resume,
              recipe=recipe)
    if accelerator.is_main_process:  # a second run on this folder is refused from now on
        life.Lock(plan.dir)
        life.begin(plan.dir, plan.intent, log=run.log)
    run.log(f"llmkit: {accelerator.num_processes} process(es), {accelerator.device}, precision {plan.precision} "
            f"({plan.precision_why}), " + (f"DeepSpeed ZeRO-{run.zero_stage}" if plan.ds_config else "no DeepSpeed"))
    for line in plan.checked:
        run.log(f"check: {line}")
    for line in preflight.warnings(cfg):
        run.log(line)
    accelerator.wait_for_everyone()  # the folder is llmkit's before any rank writes into it
    run.stop = StopSignal(accelerator, timeout)
    memory_now = preflight.recheck_memory(plan)  # the process group and DeepSpeed are up: their memory is known
    if memory_now:
        run.log(memory_now)
        run.live_estimate = plan.estimate.peak_device_bytes  # reported beside the live peak the run measures
    trackers.start(accelerator, cfg, plan.dir, trackers.hyperparameters(
        cfg, world_size=accelerator.num_processes, precision=plan.precision, zero_stage=run.zero_stage))
    return run


def run_tokenizer(run: Run):
    """The run's tokenizer: the model's (or model.tokenizer). From-scratch runs without one: rank 0 first trains a
    byte-level BPE tokenizer on the train split into <run_dir>/tokenizer (vocab size from the model config), which
    every rank then loads."""
    cfg = run.cfg
    if model.needs_trained_tokenizer(cfg.model):
        folder = run.dir.tokenizer
        def train() -> None:
            size = int(model.read_config(cfg.model).vocab_size)
            tok = model.train_tokenizer(lm.training_texts(cfg.data), size, folder)
            run.log(f"tokenizer: trained a byte-level BPE tokenizer ({len(tok)} tokens, vocab_size {size}) on the "
                    f"train split into {folder}")

        run.main_first(train, others=False)
        run.tokenizer_from = str(folder)
        return model.load_tokenizer(replace(cfg.model, tokenizer=run.tokenizer_from))
    return model.load_tokenizer(cfg.model)
