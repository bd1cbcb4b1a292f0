"""Engine: precision and DeepSpeed resolution, the Accelerator, and the explicit training / eval loop."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_scheduler

from llmkit import checkpoint, memory, validate
from llmkit.config import Config
from llmkit.data import ClassificationData, LengthGroupedBatchSampler
from llmkit.errors import LlmkitError
from llmkit.metrics import classification_metrics

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
REDUCE_BUCKET_MIN = 25_000_000  # elements; the floor of DeepSpeed's reduce_bucket_size "auto"


def auto_reduce_bucket(hidden: int | None) -> int:
    """DeepSpeed's reduce_bucket_size for "auto": hidden^2 (what HF's Trainer fills in), but at least 25M
    elements (50 MB in bf16): a small model's buckets would be tiny, and every bucket is one collective.
    MiniLM on 2 CPU ranks: 147k-element buckets (83 all-reduces per step) ran 48 samples/s, 25M (one per step)
    60 (bench/README.md)."""
    return max((hidden or 0) ** 2, REDUCE_BUCKET_MIN)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is ~100x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> tuple[str, str]:
    """The precision to run in for this hardware, and why."""
    gpu = torch.cuda.is_available()
    if requested == "fp16" and not gpu:
        raise LlmkitError("train.precision is fp16, but no GPU is available: fp16 with loss scaling is a GPU mode. "
                          "Use precision: bf16 or fp32 (or auto) on CPU.")
    if requested == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise LlmkitError("train.precision is bf16, but this GPU does not support bf16: use fp16 or fp32")
    if requested != "auto":
        return requested, "set in the config"
    if gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU lacks bf16"
    if cpu_has_native_bf16():
        return "bf16", "auto: the CPU has native bf16 instructions"
    return "fp32", "auto: this CPU has no native bf16 (bf16 would be ~100x slower than fp32)"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_source(cfg: Config) -> tuple[dict, str] | None:
    """The DeepSpeed JSON (and where it came from), or None when the run does not use DeepSpeed."""
    path = cfg.deepspeed.config_file or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        try:
            return json.loads(Path(path).read_text()), path
        except (OSError, json.JSONDecodeError) as exc:
            raise LlmkitError(f"DeepSpeed config '{path}' cannot be read as JSON: {exc}") from None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # ZeRO set in the Accelerate yaml itself (no JSON): build the same skeleton Accelerate would
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        zero = {"stage": stage}
        for part, env in (("offload_optimizer", "OFFLOAD_OPTIMIZER_DEVICE"), ("offload_param", "OFFLOAD_PARAM_DEVICE")):
            device = os.environ.get(f"ACCELERATE_DEEPSPEED_{env}", "none")
            if device != "none":
                zero[part] = {"device": device}
        return {"zero_optimization": zero}, "the Accelerate config"
    if cfg.deepspeed.zero_stage is not None:
        return {"zero_optimization": {"stage": cfg.deepspeed.zero_stage}}, "deepspeed.zero_stage"
    return None


def resolve_deepspeed(cfg: Config, precision: str, world_size: int, hidden: int | None) -> dict | None:
    """Fill each "auto" of the DeepSpeed config from the llmkit config; a value set in both must agree."""
    found = _deepspeed_source(cfg)
    if found is None:
        return None
    # keys starting with "_" are notes for people (JSON has no comments), not DeepSpeed settings
    ds = {k: copy.deepcopy(v) for k, v in found[0].items() if not k.startswith("_")}
    source = found[1]
    t = cfg.train
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise LlmkitError(f"the DeepSpeed config ({source}) has an '{section}' section; llmkit builds the "
                              f"{section} from train.* in its own config. Remove the section from the JSON.")
    zero = ds.setdefault("zero_optimization", {})
    wanted = {
        ("train_micro_batch_size_per_gpu",): (t.per_device_batch_size, "train.per_device_batch_size"),
        ("gradient_accumulation_steps",): (t.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        ("train_batch_size",): (t.per_device_batch_size * t.gradient_accumulation_steps * world_size,
                                "train.per_device_batch_size x gradient_accumulation_steps x world size"),
        ("gradient_clipping",): (t.max_grad_norm, "train.max_grad_norm"),
        ("bf16", "enabled"): (precision == "bf16", "train.precision"),
        ("fp16", "enabled"): (precision == "fp16", "train.precision"),
    }
    if cfg.deepspeed.zero_stage is not None:
        wanted[("zero_optimization", "stage")] = (cfg.deepspeed.zero_stage, "deepspeed.zero_stage")
    for keys, (value, ours) in wanted.items():
        node = ds
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        have = node.get(keys[-1], "auto")
        if have == "auto":
            node[keys[-1]] = value
        elif have != value and not (isinstance(value, float) and isinstance(have, (int, float))
                                    and math.isclose(have, value)):
            raise LlmkitError(f"'{'.'.join(keys)}' is {have!r} in the DeepSpeed config ({source}) but {value!r} from "
                              f"{ours} in the llmkit config. Set it to \"auto\" in the JSON (llmkit fills it) or "
                              "make the two agree.")
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
    stage = zero.setdefault("stage", 0)
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = auto_reduce_bucket(hidden)
    if hidden:
        for key, value in (("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    if stage == 3:
        key = "stage3_gather_16bit_weights_on_model_save"
        if zero.get(key, "auto") not in ("auto", True):
            raise LlmkitError(f"zero_optimization.{key} is false in the DeepSpeed config ({source}); llmkit needs it "
                              "to gather full ZeRO-3 weights for the export. Set it to true or \"auto\".")
        zero[key] = True
    left = [k for k, v in _flatten(ds).items() if v == "auto"]
    if left:
        raise LlmkitError(f"the DeepSpeed config ({source}) has \"auto\" values llmkit cannot fill: {', '.join(left)}. "
                          "Give them explicit values.")
    ds["steps_per_print"] = 10**9  # llmkit logs; keep DeepSpeed's per-step prints quiet
    return ds


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_accelerate_env(cfg: Config, precision: str) -> None:
    """Knobs the Accelerate yaml may also set must agree with the llmkit config (one source of truth)."""
    t = cfg.train
    checks = [
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", t.gradient_accumulation_steps,
         "train.gradient_accumulation_steps", int),
        ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", t.max_grad_norm, "train.max_grad_norm", float),
        ("ACCELERATE_MIXED_PRECISION", "mixed_precision", ACCELERATE_PRECISION[precision], "train.precision", str),
    ]
    for env, name, ours, key, cast in checks:
        raw = os.environ.get(env)
        if raw in (None, "", "auto") or (env == "ACCELERATE_MIXED_PRECISION" and raw == "no"):
            continue
        if cast(raw) != ours:
            raise LlmkitError(f"the Accelerate config sets {name}={raw} but the llmkit config has {key} -> {ours}. "
                              f"Remove {name} from the Accelerate yaml: llmkit's config is the one place to set it.")


class LossScaleWatchdog:
    """Stops an fp16 run whose dynamic loss scale sits at its floor: every step then overflows or underflows."""

    def __init__(self, patience: int, floor: float = 1.0):
        self.patience, self.floor, self.at_floor = patience, floor, 0

    def update(self, scale: float | None, step: int, steps: int = 1) -> None:
        """`scale` as read at `step`, `steps` optimizer steps after the previous reading."""
        if scale is None:
            return
        self.at_floor = self.at_floor + steps if scale <= self.floor else 0
        if self.at_floor >= self.patience:
            raise LlmkitError(f"the fp16 loss scale has been at its minimum ({scale:g}) for {self.at_floor} steps "
                              f"(step {step}): gradients keep overflowing and training is skipping updates. Use "
                              "precision bf16 (or fp32), lower train.learning_rate, or check the data for outliers.")


def loss_scale(accelerator: Accelerator, model) -> float | None:
    """The current fp16 loss scale (DeepSpeed or torch GradScaler), or None when there is none."""
    optimizer = getattr(model, "optimizer", None)  # the DeepSpeed engine's optimizer
    for holder in (optimizer, getattr(optimizer, "loss_scaler", None)):
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(holder, attr, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


@dataclass
class Run:
    """Everything set up before training: the config, the Accelerator and the resolved settings."""
    cfg: Config
    accelerator: Accelerator
    precision: str
    ds_config: dict | None
    output_dir: Path
    hub_uploader: object | None = None  # rank 0 with output.hub_strategy every_save: llmkit.hub.CheckpointUploader

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """To TensorBoard and to <output_dir>/metrics.jsonl (one JSON object per call)."""
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **scalars}) + "\n")


def check_output_dir(cfg: Config) -> Path:
    """Refuse an unsafe output dir, and one that holds another run unless asked to overwrite."""
    validate.check_output_dir_is_safe(cfg)
    out = Path(cfg.output.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output.output_dir '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.output.overwrite_output_dir or cfg.checkpoint.resume_from):
        raise LlmkitError(f"output.output_dir '{out}' already holds files from another run. Pick a new directory "
                          "set output.overwrite_output_dir: true (the old export is replaced only when the new "
                          "one is complete), or continue it with --checkpoint.resume_from latest.")
    return out


def run_info(accelerator: Accelerator, precision: str, ds_config: dict | None) -> dict:
    """What ran where: for the report and the model card."""
    import importlib.metadata
    import platform
    import subprocess

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
        "device": device, "precision": precision,
        "zero_stage": ds_config["zero_optimization"]["stage"] if ds_config else None,
        "versions": versions, "git_commit": commit, "python": platform.python_version(),
    }


def setup(cfg: Config, hidden: int | None) -> Run:
    """Resolve precision and DeepSpeed, then start the Accelerator (and the process group)."""
    precision, why = resolve_precision(cfg.train.precision)
    _check_accelerate_env(cfg, precision)
    ds_config = resolve_deepspeed(cfg, precision, _world_size(), hidden)
    out = check_output_dir(cfg)
    checked = validate.preflight(cfg, precision, _world_size())  # the same checks as `llmkit validate`
    if cfg.output.push_to_hub:  # no token: say so now, not after hours of training
        from llmkit.hub import token

        token()
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // local))
    handlers = []
    if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # without gloo, Accelerate + DeepSpeed on CPU see world size 1 and DeepSpeed rejects the batch sizes
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config is not None else None
    accelerator = Accelerator(
        mixed_precision=ACCELERATE_PRECISION[precision],
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        kwargs_handlers=handlers,
        log_with="tensorboard",
        project_dir=str(out),
    )
    set_seed(cfg.train.seed)
    if not accelerator.is_local_main_process:  # progress bars (tokenization, loading) on rank 0 only
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    accelerator.wait_for_everyone()  # every rank has checked output_dir before rank 0 writes into it
    run = Run(cfg, accelerator, precision, ds_config, out)
    o = cfg.output
    if o.push_to_hub and o.hub_strategy == "every_save" and accelerator.is_main_process:
        from llmkit.hub import CheckpointUploader

        run.hub_uploader = CheckpointUploader(o.hub_model_id, o.hub_private, o.hub_revision, out, log=run.log)
    stage = ds_config["zero_optimization"]["stage"] if ds_config else None
    run.log(f"llmkit: {accelerator.num_processes} process(es), {accelerator.device}, precision {precision} ({why}), "
            + (f"DeepSpeed ZeRO-{stage}" if ds_config else "no DeepSpeed"))
    run.log("checks: " + "; ".join(checked))
    for line in validate.warnings(cfg):
        run.log(line)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "training_config.yaml")
        (out / "run_info.json").write_text(json.dumps(run_info(accelerator, precision, ds_config), indent=2) + "\n")
        if ds_config:
            (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    accelerator.init_trackers("runs")
    return run


class RowErrors(torch.utils.data.Dataset):
    """A dataset whose failures name the row: an exception while reading row i becomes a clear error."""

    def __init__(self, dataset, rank: int):
        self.dataset, self.rank = dataset, rank
        self.fault = os.environ.get("LLMKIT_FAULT", "").startswith("row@")  # crash tests only

    def __len__(self) -> int:
        return len(self.dataset)

    def _row(self, i: int):
        try:
            if self.fault and _fault("row", int(i), self.rank):
                raise ValueError("a broken row (injected)")
            return self.dataset[i]
        except Exception as exc:
            raise LlmkitError(f"reading training row {i} failed: {exc.__class__.__name__}: {exc}. Fix or drop that "
                              "row of the train split (its index is after the shuffle by train.seed).") from exc

    def __getitem__(self, i: int):
        return self._row(i)

    def __getitems__(self, indices: list[int]) -> list:
        # the datasets library reads a whole batch at once (fast); on failure, find the row one by one
        if not self.fault and hasattr(self.dataset, "__getitems__"):
            try:
                return self.dataset.__getitems__(indices)
            except Exception:
                pass
        return [self._row(i) for i in indices]


def loader_options(cfg: Config, persistent: bool = True) -> dict:
    """DataLoader workers and pinned memory from train.*: pinning only pays off when batches go to a GPU."""
    t = cfg.train
    pin = torch.cuda.is_available() if t.pin_memory is None else t.pin_memory
    return {"num_workers": t.dataloader_workers, "pin_memory": pin,
            "persistent_workers": persistent and t.dataloader_workers > 0}


def train_loader(run: Run, dataset, lengths: list[int] | None, collate) -> DataLoader:
    """Batches of similar length (when `lengths` are known and data.group_by_length is on), else shuffled rows."""
    t = run.cfg.train
    dataset = RowErrors(dataset, run.accelerator.process_index)
    options = loader_options(run.cfg)
    if lengths is not None and run.cfg.data.group_by_length:
        sampler = LengthGroupedBatchSampler(lengths, t.per_device_batch_size, run.accelerator.num_processes,
                                            seed=t.seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **options)
    gen = torch.Generator().manual_seed(t.seed)
    return DataLoader(dataset, batch_size=t.per_device_batch_size, shuffle=True, generator=gen, collate_fn=collate,
                      **options)


def dataloaders(run: Run, data: ClassificationData, tokenizer):
    """Train loader (length-grouped or shuffled) and eval/test loaders (length-sorted), not yet prepared."""
    t = run.cfg.train
    collate = DataCollatorWithPadding(tokenizer)
    train = train_loader(run, data.train, data.train_lengths, collate)
    evals = {name: DataLoader(ds, batch_size=t.eval_batch_size, collate_fn=collate,
                              **loader_options(run.cfg, persistent=False))
             for name, ds in (("validation", data.eval), ("test", data.test)) if ds is not None}
    return train, evals


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm weights."""
    t = cfg.train
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[t.adamw_impl]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             **kernel)


@torch.no_grad()
def predict(accelerator: Accelerator, model, loader) -> dict[str, np.ndarray]:
    """Logits, labels and rows for a whole split, gathered from every rank without duplicates."""
    model.eval()
    parts: dict[str, list] = {"logits": [], "labels": [], "row": [], "loss": []}
    for batch in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        row = batch.pop("row")
        out = model(**batch)
        loss = out.loss.detach().float().repeat(len(row))
        logits, labels, row, loss = accelerator.gather_for_metrics(
            (out.logits.float(), batch["labels"], row, loss))
        for key, value in zip(("logits", "labels", "row", "loss"), (logits, labels, row, loss)):
            parts[key].append(value.cpu().numpy())
    model.train()
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(run: Run, model, loader, num_labels: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics of one split through the shipped `evaluate` modules; 1 rank and N ranks agree exactly."""
    out = predict(run.accelerator, model, loader)
    preds = out["logits"].argmax(-1)
    metrics = classification_metrics(preds.tolist(), out["labels"].tolist(), num_labels)
    metrics["loss"] = float(out["loss"].mean())
    metrics["samples"] = int(len(preds))
    return metrics, out


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, the ranks agree, a checkpoint is written."""

    def __init__(self, acc: Accelerator):
        self.name = None
        self._old = {sig: signal.signal(sig, self._catch) for sig in (signal.SIGTERM, signal.SIGINT)}
        # the flag travels through a host-side (gloo) group: asking every step must not wait for the GPU
        self.group = None
        if acc.num_processes > 1 and acc.device.type != "cpu":
            self.group = torch.distributed.new_group(backend="gloo")

    def _catch(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self, acc: Accelerator) -> bool:
        """True on every rank as soon as any rank got a signal (one tiny host all-reduce per step)."""
        flag = torch.tensor(1.0 if self.name else 0.0)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(flag, group=self.group)
        return bool(flag > 0)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _fault(point: str, step: int, rank: int) -> bool:
    """Fault injection for the crash tests: LLMKIT_FAULT=<point>@<step>:<rank> (sigterm@5:1, kill_in_save@4:1,
    oserror_in_save@4:1, nan@3:0, kill@5:1 (SIGKILL in the middle of a step), row@7:0). Signals are sent here;
    the other points return True for the caller to act."""
    if os.environ.get("LLMKIT_FAULT", "") != f"{point}@{step}:{rank}":
        return False
    if os.environ.get("LLMKIT_FAULT_STAMP"):  # when the fault fired, for the tests that time the aftermath
        Path(os.environ["LLMKIT_FAULT_STAMP"]).write_text(str(time.time()))
    if point in ("sigterm", "kill_in_save", "kill"):
        os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGKILL)
    if point == "oserror_in_save":
        raise OSError(28, "No space left on device (injected)")
    return True


def _save(run: Run, state: checkpoint.TrainerState) -> None:
    c = run.cfg.checkpoint
    rank = run.accelerator.process_index
    hook = (lambda: (_fault("kill_in_save", state.step, rank), _fault("oserror_in_save", state.step, rank))) \
        if os.environ.get("LLMKIT_FAULT") else None
    path = checkpoint.save(run, state, c.keep_last, c.keep_best, before_rename=hook)
    run.log(f"checkpoint: {path}")
    if run.hub_uploader is not None and run.accelerator.is_main_process:
        run.hub_uploader.submit(path)  # in the background: training goes on


def _stop_if_nonfinite(run: Run, nonfinite_at: torch.Tensor) -> None:
    """Stop (all ranks agree) when any rank saw a NaN/inf loss since the start, naming the first such step."""
    step = int(run.accelerator.gather(nonfinite_at.view(1)).max().item())
    if step:
        latest = checkpoint.resolve_latest(run.output_dir / "checkpoints")
        raise LlmkitError(f"the training loss became NaN/inf at step {step}: training diverged. "
                          f"{'The last good checkpoint is ' + latest if latest else 'No checkpoint was written'}; "
                          "nothing after step " + str(step - 1) + " was saved. Lower train.learning_rate, keep "
                          "train.max_grad_norm on, or use bf16/fp32 instead of fp16.")


def compile_blocks(model) -> int:
    """torch.compile each block of the model's repeated layer stack, in place: one compiled graph serves every
    layer, the parameter names stay as they are (checkpoints and exports unchanged), DeepSpeed's wrapper stays
    outside. Dynamic shapes, because padded lengths differ from batch to batch."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
              and len({type(block) for block in m}) == 1]
    if not stacks:
        raise LlmkitError(f"train.torch_compile: {type(model).__name__} has no stack of repeated layers to compile; "
                          "turn train.torch_compile off")
    blocks = [block for stack in stacks for block in stack]
    for block in blocks:
        block.compile(backend="inductor", dynamic=True)
    return len(blocks)


LOWER_IS_BETTER = ("loss", "perplexity")
PROFILE_WARMUP = 3


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def step_phases(events, gpu: bool) -> dict[str, float]:
    """Milliseconds per profiled step: the whole step, the loop's phases (inclusive; under DeepSpeed the
    optimizer step runs inside backward), and what matmuls and collectives took themselves (self time; on a GPU,
    device time)."""
    self_time = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    by_name = {e.key: e for e in events}
    steps = sum(e.count for e in events if e.key.startswith("ProfilerStep"))
    if not steps:
        return {}
    per_step = lambda us: round(us / steps / 1000, 3)  # noqa: E731  (profiler times are microseconds)
    out = {"steps": steps, "step_ms": per_step(sum(e.cpu_time_total for e in events
                                                    if e.key.startswith("ProfilerStep")))}
    for phase in ("forward", "backward", "optimizer"):
        event = by_name.get(f"llmkit/{phase}")
        out[f"{phase}_ms"] = per_step(event.cpu_time_total) if event else 0.0
    out["gemm_ms"] = per_step(sum(self_time(e) for e in events if e.key in GEMM_OPS))
    out["collectives_ms"] = per_step(sum(self_time(e) for e in events if e.key.startswith("c10d::")))
    out["data_ms"] = per_step(sum(e.cpu_time_total for e in events if e.key.startswith("enumerate(DataLoader)")))
    return out


def _profiler(run: Run):
    """torch.profiler over train.profile_steps optimizer steps after a short warm-up; each rank writes its op
    table (by self time), a Chrome trace and the step's phases to <output_dir>/profile. The loop labels
    forward/backward/optimizer."""
    folder = run.output_dir / "profile"
    rank = run.accelerator.process_index
    gpu = torch.cuda.is_available()

    def write(prof) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        sort = "self_device_time_total" if gpu else "self_cpu_time_total"
        (folder / f"rank{rank}_ops.txt").write_text(events.table(sort_by=sort, row_limit=60) + "\n")
        prof.export_chrome_trace(str(folder / f"rank{rank}_trace.json"))
        (folder / f"rank{rank}_phases.json").write_text(json.dumps(step_phases(events, gpu), indent=2) + "\n")
        run.log(f"profile: {folder}")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    schedule = torch.profiler.schedule(wait=0, warmup=PROFILE_WARMUP, active=run.cfg.train.profile_steps, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)


def train(run: Run, model, optimizer, train_loader, eval_loader, eval_fn) -> dict:
    """The training loop: accumulate, clip, step, log; evaluate each epoch; checkpoint; resume exactly.

    `eval_fn(model, loader, step) -> dict of metrics` scores the validation split (classification or LM)."""
    cfg, acc = run.cfg, run.accelerator
    t, c = cfg.train, cfg.checkpoint
    estimate = memory.for_run(run.ds_config, memory.parameters_of(model), acc.num_processes, run.precision,
                              largest_param=memory.largest_of(model))
    run.log("memory estimate (ZeRO paper formulas and DeepSpeed's peak, activations excluded):\n" + estimate.table())
    watchdog = None
    if run.precision == "fp16":
        floor = float(((run.ds_config or {}).get("fp16") or {}).get("min_loss_scale", 1))
        watchdog = LossScaleWatchdog(patience=t.loss_scale_patience, floor=floor)
    # the loader length per rank is known only once Accelerate has sharded it
    train_loader = acc.prepare_data_loader(train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    model, optimizer, eval_loader = acc.prepare(model, optimizer, eval_loader)
    if t.torch_compile:
        compiled = compile_blocks(acc.unwrap_model(model))
        run.log(f"torch.compile: {compiled} transformer blocks (inductor, dynamic shapes); the first steps are slow")
    # built on the prepared optimizer: ZeRO-3 regroups the parameters, and Accelerate would hand DeepSpeed
    # only its own scheduler types anyway. Stepped by us once per optimizer step.
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    acc.register_for_checkpointing(scheduler)
    state, rng = checkpoint.TrainerState(sampler_seed=t.seed), None
    if c.resume_from:
        path = checkpoint.resolve(run.output_dir, c.resume_from)
        state, rng = checkpoint.load(run, path)
        run.log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, batch {state.batches_in_epoch}")
    batch_sampler = getattr(train_loader, "batch_sampler", None)
    inner_sampler = getattr(batch_sampler, "batch_sampler", batch_sampler)
    run.log(f"train: {len(train_loader)} batches per rank per epoch, {steps_per_epoch} optimizer steps per epoch, "
            f"{total_steps} steps in all")
    model.train()
    seen_tokens, seen_rows = 0, 0
    real_tokens = torch.zeros((), dtype=torch.long, device=acc.device)  # a tensor: no device sync per batch
    running_loss, running_n = torch.zeros((), device=acc.device), 0
    # the first optimizer step whose loss was NaN/inf on this rank (0: none); a tensor, so no sync per batch
    nonfinite_at = torch.zeros((), dtype=torch.long, device=acc.device)
    start = time.perf_counter()
    paused = 0.0  # seconds spent evaluating and checkpointing: not part of the training throughput
    profiler = _profiler(run) if t.profile_steps else None
    if profiler is not None:
        profiler.start()
    stop = StopSignal(acc)
    faults = bool(os.environ.get("LLMKIT_FAULT"))  # crash tests only: read once, not per batch
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not acc.is_local_main_process)
    while state.step < total_steps:
        if hasattr(inner_sampler, "set_epoch"):
            inner_sampler.set_epoch(state.epoch)
        elif hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        # after a resume: skip the consumed batches by index, without loading them
        skip = state.batches_in_epoch
        loader = acc.skip_first_batches(train_loader, skip) if skip else train_loader
        batches = iter(loader)
        if rng is not None:
            # starting an epoch's iterator draws from torch's RNG (and happens lazily, on the first batch);
            # the uninterrupted run drew it before the checkpoint, so restore the RNG only after that
            first = next(batches, None)
            checkpoint.set_rng_state(rng)
            rng = None
            batches = itertools.chain([first] if first is not None else [], batches)
        for batch in batches:
            with acc.accumulate(model):
                with record_function("llmkit/forward"):
                    out = model(**batch)
                if faults and _fault("nan", state.step + 1, acc.process_index):
                    out.loss = out.loss * float("nan")
                bad = ~torch.isfinite(out.loss.detach())
                nonfinite_at = torch.where(bad & (nonfinite_at == 0), state.step + 1, nonfinite_at)
                if faults:
                    _fault("kill", state.step + 1, acc.process_index)  # between forward and backward
                with record_function("llmkit/backward"):
                    acc.backward(out.loss)
                with record_function("llmkit/optimizer"):
                    grad_norm = None
                    if acc.sync_gradients and t.max_grad_norm > 0 and acc.distributed_type.value != "DEEPSPEED":
                        grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
            state.batches_in_epoch += 1
            running_loss += out.loss.detach().float()
            running_n += 1
            seen_tokens += batch["attention_mask"].numel()
            seen_rows += batch["attention_mask"].shape[0]
            real_tokens += batch["attention_mask"].sum()
            if not acc.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if profiler is not None:
                profiler.step()
            if faults:
                _fault("sigterm", state.step, acc.process_index)
            # DeepSpeed keeps the fp16 scale as a Python number; torch's GradScaler keeps it on the GPU, so read
            # it only when logging: the loop must not wait for the GPU every step
            if watchdog is not None and (run.ds_config or state.step % t.logging_steps == 0):
                watchdog.update(loss_scale(acc, model), state.step, steps=1 if run.ds_config else t.logging_steps)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                if grad_norm is None and hasattr(model, "get_global_grad_norm"):
                    grad_norm = model.get_global_grad_norm()
                _stop_if_nonfinite(run, nonfinite_at)
                loss = acc.reduce(running_loss / max(running_n, 1), reduction="mean").item()
                elapsed = time.perf_counter() - start - paused
                scalars = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
                           "train/epoch": state.step / steps_per_epoch,
                           "train/real_tokens_per_s": real_tokens.item() * acc.num_processes / elapsed,
                           "train/samples_per_s": seen_rows * acc.num_processes / elapsed}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                run.log_scalars(scalars, state.step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['train/lr']:.2e}")
                running_loss.zero_()
                running_n = 0
            end_of_epoch = acc.gradient_state.end_of_dataloader
            if end_of_epoch:  # the saved position is then the start of the next epoch
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            evaluated = (t.eval_every_steps and state.step % t.eval_every_steps == 0) or end_of_epoch \
                or state.step == total_steps
            # asked before the pause is timed: waiting here for a slower rank is training time
            interrupted = stop.agreed(acc)
            pause_start = time.perf_counter()
            if evaluated:
                _stop_if_nonfinite(run, nonfinite_at)
                metrics = eval_fn(model, eval_loader, state.step)
                run.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, state.step)
                score = metrics.get(c.best_metric)
                if score is not None and c.best_metric in LOWER_IS_BETTER:
                    score = -score
                state.history.append({"step": state.step, "epoch": round(state.step / steps_per_epoch, 3),
                                      "score": score, **metrics})
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
                run.log(f"eval step {state.step}: {shown}")
            if interrupted or (c.save_every_steps and state.step % c.save_every_steps == 0) \
                    or (c.save_every_epoch and end_of_epoch):
                _stop_if_nonfinite(run, nonfinite_at)  # never replace a good checkpoint with a diverged one
                if evaluated:
                    state.history[-1]["checkpoint"] = f"step-{state.step}"
                _save(run, state)
            paused += time.perf_counter() - pause_start
            if interrupted:
                stop.restore()
                raise LlmkitError(f"stopped by {stop.name or 'a signal on another rank'} after step {state.step}; "
                                  f"the checkpoint is in {run.output_dir / 'checkpoints'}. Continue with the same "
                                  "command plus --checkpoint.resume_from latest.")
            if end_of_epoch or state.step >= total_steps:
                break
    stop.restore()
    bar.close()
    if profiler is not None:
        profiler.stop()
    elapsed = time.perf_counter() - start
    step_seconds = elapsed - paused  # throughput counts training steps only, not evaluation or checkpoints
    real_tokens = real_tokens.item()
    summary = {
        "steps": state.step, "epochs": round(state.step / steps_per_epoch, 3), "train_seconds": round(elapsed, 1),
        "step_seconds": round(step_seconds, 2),
        "world_size": acc.num_processes, "precision": run.precision,
        "zero_stage": run.ds_config["zero_optimization"]["stage"] if run.ds_config else None,
        "padding_efficiency": round(real_tokens / max(seen_tokens, 1), 4),
        "real_tokens_per_second": round(real_tokens * acc.num_processes / step_seconds, 1),
        "samples_per_second": round(seen_rows * acc.num_processes / step_seconds, 2),
        "peak_memory_bytes": _peak_memory(),
        "train_examples": len(train_loader.dataset),
        "history": state.history,
        "per_rank": sharded_elements(acc, model, optimizer),
    }
    return {"model": model, "summary": summary}


def _peak_memory() -> int:
    """This rank's peak: allocated GPU memory, or on CPU the process's maximum resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def _innermost_optimizer(optimizer):
    """Follow the wrappers (Accelerate, DeepSpeed ZeRO, bf16) down to the torch optimizer that holds the state."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def sharded_elements(acc: Accelerator, model, optimizer) -> dict[str, list[int]]:
    """Elements each rank really holds: parameters and optimizer states, read from the engine (not assumed)."""
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    state = _innermost_optimizer(optimizer).state
    states = sum(v.numel() for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    counts = acc.gather(torch.tensor([[params, states]], device=acc.device)).tolist()
    return {"parameter_elements": [c[0] for c in counts], "optimizer_state_elements": [c[1] for c in counts]}
