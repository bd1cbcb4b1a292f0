"""What `accelerate launch` hands a run, settled before its process group starts: the world size, the DeepSpeed
JSON with every "auto" filled from the llmkit config, and the Accelerate settings that must agree with it."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path

from llmkit import shipped
from llmkit.config import Config
from llmkit.config.typed import flatten, read_yaml
from llmkit.errors import LlmkitError
from llmkit.launch.precision import ACCELERATE_PRECISION

REDUCE_BUCKET_MIN = 25_000_000  # elements; the floor of DeepSpeed's reduce_bucket_size "auto"


def auto_reduce_bucket(hidden: int | None) -> int:
    """DeepSpeed's reduce_bucket_size for "auto": hidden^2 (what HF's Trainer fills in), but at least 25M
    elements (50 MB in bf16): a small model's buckets would be tiny, and every bucket is one collective.
    MiniLM on 2 CPU ranks: 147k-element buckets (83 all-reduces per step) ran 48 samples/s, 25M (one per step)
    60 (bench/README.md)."""
    return max((hidden or 0) ** 2, REDUCE_BUCKET_MIN)


def env_int(name: str, default: str, low: int = 0) -> int:
    """An integer environment variable (a launcher's, or one left in the shell); a clear error when it is not."""
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low:
        raise LlmkitError(f"the environment variable {name}={raw!r} must be a whole number >= {low}; unset it "
                          "(export -n / unset) or let `accelerate launch` set it")
    return value


def world_size() -> int:
    """Processes in the run, as the launcher set them (1 outside a launcher)."""
    return env_int("WORLD_SIZE", "1", low=1)


def local_world_size() -> int:
    """Processes of the run on this machine (the launcher's LOCAL_WORLD_SIZE; 1 outside a launcher)."""
    return env_int("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"), low=1)


def uses_deepspeed(cfg: Config) -> bool:
    """Whether the run trains under DeepSpeed (a DeepSpeed JSON from the config or the Accelerate config)."""
    return _deepspeed_source(cfg) is not None


# where a launcher's DeepSpeed path comes from, and what to do when it is not found
LAUNCHED = ("deepspeed_config_file of the Accelerate config given to `accelerate launch`, which hands it on as "
            "written (ACCELERATE_DEEPSPEED_CONFIG_FILE), so it is read against the current folder")
LAUNCHED_FIX = ("Launch with `llmkit launch` (the same arguments) or `llmkit train`, which read it against the "
                "Accelerate config that names it; or write it there as an absolute path or a shipped name ({names})")


def _deepspeed_file(cfg: Config) -> str | None:
    """The DeepSpeed JSON of the run as a path that exists (the config's, else the launcher's), or None."""
    if cfg.deepspeed.config_file:
        if cfg.deepspeed.config_file == "none":
            return None
        return str(shipped.find(cfg.deepspeed.config_file, "deepspeed", named_by="deepspeed.config_file"))
    raw = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if raw in ("", "none"):
        return None
    fix = LAUNCHED_FIX.format(names=", ".join(shipped.names("deepspeed")))
    return str(shipped.find(raw, "deepspeed", named_by=LAUNCHED, fix=fix))


def _deepspeed_source(cfg: Config) -> tuple[dict, str] | None:
    """The DeepSpeed JSON (and where it came from), or None when the run does not use DeepSpeed."""
    path = _deepspeed_file(cfg)
    if path:
        try:
            return _check_json_shape(json.loads(Path(path).read_text()), path), path
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LlmkitError(f"DeepSpeed config '{path}' cannot be read as JSON: {exc}") from None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # ZeRO set in the Accelerate yaml itself (no JSON): build the same skeleton Accelerate would
        stage = env_int("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        zero = {"stage": stage}
        for part, env in (("offload_optimizer", "OFFLOAD_OPTIMIZER_DEVICE"), ("offload_param", "OFFLOAD_PARAM_DEVICE")):
            device = os.environ.get(f"ACCELERATE_DEEPSPEED_{env}", "none")
            if device != "none":
                zero[part] = {"device": device}
        return {"zero_optimization": zero}, "the Accelerate config"
    if cfg.deepspeed.zero_stage is not None:
        return {"zero_optimization": {"stage": cfg.deepspeed.zero_stage}}, "deepspeed.zero_stage"
    return None


# DeepSpeed config sections that are objects of settings (a user's `"bf16": true` is a common slip)
DS_SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "activation_checkpointing",
               "flops_profiler", "aio", "comms_logger", "tensorboard", "wandb", "csv_monitor", "data_types")
ZERO_SECTIONS = ("offload_optimizer", "offload_param")
SUPPORTED_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED")  # Accelerate's distributed_type names


def _check_json_shape(ds, path: str) -> dict:
    """A DeepSpeed JSON must be an object, and its sections objects (with a whole-number ZeRO stage)."""
    if not isinstance(ds, dict):
        raise LlmkitError(f"DeepSpeed config '{path}' must hold a JSON object of settings, got a {type(ds).__name__}")
    for key in DS_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            hint = f' (write "{key}": {{"enabled": {json.dumps(ds[key])}}})' if isinstance(ds[key], bool) else ""
            raise LlmkitError(f"'{key}' in DeepSpeed config '{path}' must be an object of settings, got "
                              f"{json.dumps(ds[key])}{hint}")
    zero = ds.get("zero_optimization", {})
    for key in ZERO_SECTIONS:
        if key in zero and not isinstance(zero[key], dict):
            raise LlmkitError(f"'zero_optimization.{key}' in DeepSpeed config '{path}' must be an object such as "
                              f'{{"device": "cpu"}}, got {json.dumps(zero[key])}')
    for key in ZERO_SECTIONS:
        device = zero.get(key, {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise LlmkitError(f"'zero_optimization.{key}.device' in DeepSpeed config '{path}' must be none, cpu or "
                              f"nvme, got {json.dumps(device)}")
        if device == "nvme" and not zero[key].get("nvme_path"):
            raise LlmkitError(f"'zero_optimization.{key}' in DeepSpeed config '{path}' offloads to nvme but names no "
                              "nvme_path (a folder on a fast local disk); add one, or offload to cpu")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise LlmkitError(f"'zero_optimization.stage' in DeepSpeed config '{path}' must be 0, 1, 2 or 3, got "
                          f"{json.dumps(stage)}")
    return ds


def resolve_deepspeed(cfg: Config, precision: str, world_size: int, hidden: int | None,
                      accumulation: int | None = None, source: tuple[dict, str] | None = None) -> dict | None:
    """Fill each "auto" of the DeepSpeed config from the llmkit config; a value set in both must agree.
    `accumulation`: the one this launch trains with, when an elastic resume changed it (default: the config's);
    `source`: a DeepSpeed JSON and where it came from, in place of the run's (`llmkit estimate-memory`)."""
    found = source or _deepspeed_source(cfg)
    if found is None:
        return None
    # keys starting with "_" are notes for people (JSON has no comments), not DeepSpeed settings
    ds = {k: copy.deepcopy(v) for k, v in found[0].items() if not k.startswith("_")}
    source = found[1]
    t = cfg.train
    accumulation = accumulation or t.gradient_accumulation_steps
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise LlmkitError(f"the DeepSpeed config ({source}) has an '{section}' section; llmkit builds the "
                              f"{section} from train.* in its own config. Remove the section from the JSON.")
    zero = ds.setdefault("zero_optimization", {})
    wanted = {
        ("train_micro_batch_size_per_gpu",): (t.per_device_batch_size, "train.per_device_batch_size"),
        ("gradient_accumulation_steps",): (accumulation, "train.gradient_accumulation_steps"),
        ("train_batch_size",): (t.per_device_batch_size * accumulation * world_size,
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
    left = [k for k, v in flatten(ds).items() if v == "auto"]
    if left:
        raise LlmkitError(f"the DeepSpeed config ({source}) has \"auto\" values llmkit cannot fill: {', '.join(left)}. "
                          "Give them explicit values.")
    ds["steps_per_print"] = 10**9  # llmkit logs; keep DeepSpeed's per-step prints quiet
    return ds


def check_accelerate_env(cfg: Config, precision: str) -> None:
    """Knobs the Accelerate yaml may also set must agree with the llmkit config (one source of truth)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise LlmkitError("this run was launched with FSDP (ACCELERATE_USE_FSDP); llmkit trains with DeepSpeed ZeRO "
                          "or plain data parallelism. Launch with one of accelerate_configs/*.yaml")
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
        try:
            theirs = cast(raw)
        except ValueError:
            theirs = None
        if theirs is None or (env == "ACCELERATE_MIXED_PRECISION" and raw not in ACCELERATE_PRECISION.values()):
            raise LlmkitError(f"{name}={raw!r} (environment variable {env}, from the Accelerate config or the shell) "
                              f"is not a valid value; remove it: llmkit's {key} is the one place to set it")
        if theirs != ours:
            raise LlmkitError(f"the Accelerate config sets {name}={raw} but the llmkit config has {key} -> {ours} "
                              f"(environment variable {env}). Remove {name} from the Accelerate yaml: llmkit's "
                              "config is the one place to set it.")


def zero_stage(ds_config: dict | None) -> int | None:
    """The ZeRO stage of a resolved DeepSpeed config; None when the run does not use DeepSpeed."""
    return ds_config["zero_optimization"]["stage"] if ds_config else None


def accelerate_env(path: str | Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file path` gives its processes (the parts llmkit reads); `path`
    may be a shipped name, and the DeepSpeed JSON it names is read against it (as `llmkit launch` hands it on)."""
    path = shipped.find(path, "accelerate")
    acc = read_yaml(path, "Accelerate config")
    if not isinstance(acc, dict):
        raise LlmkitError(f"Accelerate config '{path}' must be a mapping of settings (as `accelerate config` writes), "
                          f"got a {type(acc).__name__}")
    recipe = sorted(set(acc) & {"model", "data", "train", "lora", "checkpoint", "output"})
    if recipe:
        raise LlmkitError(f"'{path}' looks like an llmkit recipe config (sections {recipe}), not an Accelerate "
                          "config; pass one of accelerate_configs/*.yaml as --accelerate-config")

    def whole(key: str, default: int, low: int) -> int:
        value = acc.get(key, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise LlmkitError(f"{key} in Accelerate config '{path}' must be a whole number >= {low}, got {value!r}")
        return value

    kind = acc.get("distributed_type") or "NO"
    if kind not in SUPPORTED_DISTRIBUTED:
        raise LlmkitError(f"distributed_type {kind} in Accelerate config '{path}' is not one llmkit runs: it trains "
                          f"with DeepSpeed ZeRO or plain data parallelism ({', '.join(SUPPORTED_DISTRIBUTED)}). "
                          "Start from one of accelerate_configs/*.yaml")
    env = {"WORLD_SIZE": str(whole("num_processes", 1, 1) * whole("num_machines", 1, 1)),
           "LOCAL_WORLD_SIZE": str(whole("num_processes", 1, 1) // max(whole("num_machines", 1, 1), 1) or 1)}
    if acc.get("gpu_ids") not in (None, "all"):  # Accelerate hands its processes only these GPUs ("": none)
        env["CUDA_VISIBLE_DEVICES"] = str(acc["gpu_ids"])
    if acc.get("mixed_precision"):
        env["ACCELERATE_MIXED_PRECISION"] = str(acc["mixed_precision"])
    ds = acc.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise LlmkitError(f"deepspeed_config in Accelerate config '{path}' must be a mapping (zero_stage, "
                          f"deepspeed_config_file, ...), got {ds!r}")
    if acc.get("distributed_type") == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        named = shipped.accelerate_deepspeed_file(acc, path)  # read against the Accelerate config
        if named is not None:
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(named)
        for key, var in (("zero_stage", "ZERO_STAGE"), ("offload_optimizer_device", "OFFLOAD_OPTIMIZER_DEVICE"),
                         ("offload_param_device", "OFFLOAD_PARAM_DEVICE")):
            if key in ds:
                env[f"ACCELERATE_DEEPSPEED_{var}"] = str(ds[key])
        if "gradient_accumulation_steps" in ds:
            env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(ds["gradient_accumulation_steps"])
        if "gradient_clipping" in ds:
            env["ACCELERATE_GRADIENT_CLIPPING"] = str(ds["gradient_clipping"])
    return env


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """These environment variables set for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
