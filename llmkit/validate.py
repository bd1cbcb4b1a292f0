"""Checks that need no training. `preflight` runs at the start of every recipe (before the process group);
`llmkit validate` runs it plus the model, tokenizer and data checks the recipes run next, and stops there."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import yaml

from llmkit.config import Config
from llmkit.errors import LlmkitError

GIB = 1024**3


def _positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_output_dir_is_safe(cfg: Config) -> Path:
    """The output dir, resolved: never the filesystem root, the home directory, or a folder that contains the
    working directory (a run writes checkpoints/, final/ and replaces them there)."""
    out = Path(cfg.output.output_dir).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    why = None
    if out == Path(out.anchor):
        why = "the filesystem root"
    elif out == home:
        why = "your home directory"
    elif out == cwd or out in cwd.parents:
        why = "the working directory or one of its parents"
    if why:
        raise LlmkitError(f"output.output_dir '{out}' is {why}; point it at a dedicated folder, e.g. outputs/<name>")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise LlmkitError(f"output.output_dir '{out}' is not writable ({probe} does not accept new files)")
    return out


def checkpoint_bytes(params: int, precision: str, lora: bool) -> int:
    """Rough size of one checkpoint on disk: the weights plus, for trained parameters, fp32 master weights and
    two Adam moments (LoRA: the adapters are small, counted as 2% of the model)."""
    weight = 4 if precision == "fp32" else 2
    trained = params * (0.02 if lora else 1.0)
    optimizer = 8 if precision == "fp32" else 12
    return int(params * weight + trained * optimizer)


def check_disk(cfg: Config, params: int, precision: str) -> str:
    """Enough free disk under output_dir for the checkpoints kept plus the export."""
    out = Path(cfg.output.output_dir).expanduser().resolve()
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    one = checkpoint_bytes(params, precision, cfg.lora.enabled)
    keep = cfg.checkpoint.keep_last or 1
    saving = cfg.checkpoint.save_every_steps or cfg.checkpoint.save_every_epoch or cfg.checkpoint.resume_from
    # one extra checkpoint exists while the next is written; the export holds fp32 weights (and a merged copy)
    need = (keep + 1) * one * bool(saving) + params * 4 * (2 if cfg.lora.enabled else 1)
    if need > free:
        raise LlmkitError(f"not enough disk under {probe}: checkpoints (about {one / GIB:.2f} GiB each, {keep} kept "
                          f"+ 1 being written) and the export need ~{need / GIB:.2f} GiB, {free / GIB:.2f} GiB are "
                          "free. Free space, lower checkpoint.keep_last, or pick another output.output_dir.")
    return f"disk: ~{need / GIB:.2f} GiB needed, {free / GIB:.1f} GiB free under {probe}"


def check_model(cfg: Config) -> tuple[object, str]:
    """The model config loads (local dir, asset or Hub id) and data.max_length fits its positions."""
    from transformers import AutoConfig

    from llmkit.model import _hub_error, locate

    name = locate(cfg.model.name_or_path, "model.name_or_path")
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error("the model config", name, exc) from None
    limit = _positions(config)
    if limit is not None and cfg.data.max_length > limit:
        raise LlmkitError(f"data.max_length {cfg.data.max_length} is over the model's limit of {limit} positions "
                          f"({config.model_type}); set data.max_length <= {limit}")
    return config, f"model: {config.model_type}, {limit or 'unknown'} positions, max_length {cfg.data.max_length} fits"


def warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but deserve a loud line."""
    out = []
    if cfg.model.trust_remote_code:
        out.append(f"warning: model.trust_remote_code is on: Python code from '{cfg.model.name_or_path}' (and "
                   f"'{cfg.model.tokenizer or cfg.model.name_or_path}') will run on this machine. Use it only for "
                   "repos you trust, pinned with model.revision.")
    return out


def preflight(cfg: Config, precision: str, world_size: int) -> list[str]:
    """The cheap checks every recipe runs first: model config and sequence length, output dir, disk."""
    from llmkit import memory
    from llmkit.model import locate

    config, model_line = check_model(cfg)
    out = check_output_dir_is_safe(cfg)
    task = "causal-lm" if any(a.endswith("ForCausalLM") for a in config.architectures or []) else "classification"
    name = locate(cfg.model.name_or_path, "model.name_or_path")
    try:
        params = memory.count_parameters(name, task, cfg.model.trust_remote_code)
    except Exception:  # an architecture we cannot build on the meta device: skip the disk estimate
        return [model_line, f"output: {out}"]
    return [model_line, f"output: {out}", check_disk(cfg, params, precision)]


def accelerate_env(path: str | Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file path` gives its processes (the parts llmkit reads)."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"Accelerate config '{path}' does not exist")
    try:
        acc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LlmkitError(f"Accelerate config '{path}' is not valid YAML: {exc}") from None
    env = {"WORLD_SIZE": str(int(acc.get("num_processes", 1)) * int(acc.get("num_machines", 1) or 1))}
    if acc.get("mixed_precision"):
        env["ACCELERATE_MIXED_PRECISION"] = str(acc["mixed_precision"])
    ds = acc.get("deepspeed_config") or {}
    if acc.get("distributed_type") == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if ds.get("deepspeed_config_file"):
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds["deepspeed_config_file"])
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
def _environ(values: dict[str, str]):
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


def run_all(config_path: str, overrides: list[str], accelerate_config: str | None, log=print) -> None:
    """`llmkit validate`: every check a recipe makes before its first training step, in order; stops at the
    first problem (raised as LlmkitError)."""
    from llmkit import data, engine, lm_data, memory, model
    from llmkit.config import load_config
    from llmkit.model import locate

    cfg = load_config(config_path, overrides)
    log(f"ok  config: {config_path} (schema, types, ranges)")
    for line in warnings(cfg):
        log(line)
    env = accelerate_env(accelerate_config) if accelerate_config else {}
    with _environ(env):
        world = engine._world_size()
        precision, why = engine.resolve_precision(cfg.train.precision)
        log(f"ok  precision: {precision} ({why})")
        engine._check_accelerate_env(cfg, precision)
        config, line = check_model(cfg)
        ds = engine.resolve_deepspeed(cfg, precision, world, getattr(config, "hidden_size", None))
        stage = ds["zero_optimization"]["stage"] if ds else None
        launch = f"DeepSpeed ZeRO-{stage}, no 'auto' left" if ds else "no DeepSpeed"
        log(f"ok  launch: {world} process(es), {launch}")
    log(f"ok  {line}")
    engine.check_output_dir(cfg)
    log(f"ok  output: {check_output_dir_is_safe(cfg)} (writable, holds no other run)")
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or []) or bool(
        cfg.data.prompt_column or cfg.data.messages_column or cfg.data.prompt_template)
    name = locate(cfg.model.name_or_path, "model.name_or_path")
    params, largest = memory.model_sizes(name, "causal-lm" if causal else "classification",
                                         cfg.model.trust_remote_code)
    log(f"ok  {check_disk(cfg, params, precision)}")
    est = memory.for_run(ds, params, world, precision, largest_param=largest)
    table = "\n".join("      " + r for r in est.table().splitlines())
    log(f"ok  memory (ZeRO formulas and DeepSpeed's peak, activations excluded):\n{table}")
    if model.needs_trained_tokenizer(cfg.model):
        log("ok  tokenizer: none given; a byte-level BPE tokenizer will be trained on the train split")
        return
    tokenizer = model.load_tokenizer(cfg.model)
    log(f"ok  tokenizer: {type(tokenizer).__name__}, pad token {tokenizer.pad_token!r}")
    if causal:
        ds_lm = lm_data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=lambda m: None)
        log(f"ok  data: {ds_lm.mode}, train {len(ds_lm.train)}, validation {len(ds_lm.eval)} examples"
            + (f", labels {ds_lm.label_names}" if ds_lm.label_names else ""))
    else:
        labeled = data.load_labeled(cfg.data, seed=cfg.train.seed, log=lambda m: None)
        sizes = ", ".join(f"{role} {len(rows)}" for role, rows in labeled.rows.items())
        dropped = sum(labeled.dropped_rows.values())
        log(f"ok  data: {sizes} rows, labels {labeled.label_names}" + (f", {dropped} empty rows dropped" if dropped
                                                                          else ""))
    log("all checks passed")
