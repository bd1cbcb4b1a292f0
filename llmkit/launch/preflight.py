"""Every check that needs no training, in the order a run meets them. The recipes run `check` before their
process group starts; `llmkit validate` runs the same `check`, then `check_inputs` (the tokenizer and the data
a recipe loads next), and stops. Each check raises LlmkitError naming what is wrong and how to fix it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmkit import compression, memory, model
from llmkit.config import Config, schema
from llmkit.config.checks import check_hub_token
from llmkit.data import label_balance, lm, sources
from llmkit.errors import LlmkitError
from llmkit.launch import parallel, trackers
from llmkit.launch.precision import Hardware, hardware, resolve_precision
from llmkit.rundir import checkpoints, elastic, life
from llmkit.rundir.layout import RunDir

GIB = 1024**3


@dataclass
class Plan:
    """What the checks settled: the run starts from this."""
    precision: str
    precision_why: str
    ds_config: dict | None  # resolved: no "auto" left; None without DeepSpeed
    dir: RunDir  # output.output_dir, resolved once (RunDir.of)
    intent: str  # what happens to output_dir: "new", "overwrite" or "resume" (llmkit.rundir.life)
    causal_lm: bool
    accumulation: int  # gradient accumulation this launch trains with (an elastic resume may change it)
    checked: list[str] = field(default_factory=list)  # one line per check passed
    resume: checkpoints.Resume | None = None  # the checkpoint this run continues, verified
    estimate: memory.MemoryEstimate | None = None  # the memory checked (None: the model could not be sized)
    hardware: Hardware | None = None  # what it was checked against


def warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but deserve a loud line."""
    out = []
    if cfg.model.trust_remote_code:
        out.append(f"warning: model.trust_remote_code is on: Python code from '{cfg.model.name_or_path}' (and "
                   f"'{cfg.model.tokenizer or cfg.model.name_or_path}') will run on this machine. Use it only for "
                   "repos you trust, pinned with model.revision.")
    return out


def _version(package: str) -> tuple[int, ...] | None:
    """An installed package's version as numbers (major, minor), or None."""
    import importlib.metadata

    try:
        return tuple(int(p) for p in importlib.metadata.version(package).split(".")[:2] if p.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return None


def check_devices(hw: Hardware, local_ranks: int) -> None:
    """Each rank on this machine gets a GPU of its own, or none sees a GPU (the cpu_* configs hide them)."""
    if hw.gpus and local_ranks > hw.gpus:
        raise LlmkitError(f"{local_ranks} processes on this machine but {hw.gpus} GPU(s) visible: rank {hw.gpus} "
                          f"would ask for a GPU that is not there. Launch with --num_processes {hw.gpus}, or use an "
                          "accelerate_configs/cpu_*.yaml config to run on the CPU")


def check_loading(cfg: Config, precision: str, hw: Hardware, deepspeed: bool) -> None:
    """model.dtype and model.attn_implementation against the precision, the launch and this machine."""
    import importlib.util

    wanted = {"fp32": ("float32",), "bf16": ("float32", "bfloat16"), "fp16": ("float32", "float16")}[precision]
    if cfg.model.dtype and cfg.model.dtype not in wanted:
        raise LlmkitError(f"model.dtype {cfg.model.dtype} does not go with precision {precision}: load the weights "
                          f"as {' or '.join(wanted)} (or leave model.dtype unset)")
    if precision == "fp16" and cfg.model.dtype == "float16" and not deepspeed:
        # without DeepSpeed (its fp32 master weights) Accelerate's GradScaler refuses fp16 gradients at step 1
        raise LlmkitError("model.dtype float16 with precision fp16 and no DeepSpeed: torch's gradient scaler cannot "
                          "unscale fp16 gradients, so the first step would fail. Load the weights in float32 (leave "
                          "model.dtype unset) and let fp16 autocast, or launch with a DeepSpeed config")
    if cfg.lora.load_in_4bit and not hw.gpus:
        # measured with bitsandbytes 0.50.2: its CPU backend loads and trains a 4-bit model, but the first
        # no-grad forward after a training step fails (a shape error in _convert_weight_packed_for_cpu), so a
        # run could not evaluate or export
        raise LlmkitError("lora.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' CPU backend fails to evaluate "
                          "a 4-bit model after a training step. On this machine use plain LoRA (drop "
                          "lora.load_in_4bit)")
    if cfg.lora.load_in_4bit and (_version("bitsandbytes") or (0,)) < (0, 50):
        raise LlmkitError(f"lora.load_in_4bit (QLoRA) needs bitsandbytes >= 0.50 (found: {_version('bitsandbytes')}); "
                          "the export check reloads the 4-bit base on the CPU, which older ones cannot: "
                          "`pip install llmkit[qlora]`")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not hw.gpus:
            raise LlmkitError("model.attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa (or leave it "
                              "unset) on this machine")
        if not hw.gpu_bf16:
            raise LlmkitError(f"model.attn_implementation flash_attention_2 needs an Ampere (sm80) or newer GPU; "
                              f"{hw.describe_gpu()} is older: use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise LlmkitError("model.attn_implementation flash_attention_2 needs the flash-attn package (`pip "
                              "install flash-attn`); or use sdpa")
        if precision == "fp32":
            raise LlmkitError("flash_attention_2 runs in bf16 or fp16 only; set train.precision bf16 (or use sdpa)")


def check_output_dir_is_safe(cfg: Config) -> RunDir:
    """The run's folder, output.output_dir resolved once, here (RunDir.of: absolute, for the fresh processes the
    run hands it to), then checked with its links followed: never the filesystem root, the home directory, or a
    folder that contains the working directory (a run writes checkpoints/, final/ and replaces them there)."""
    run = RunDir.of(cfg.output.output_dir)
    given = run.root
    for part in (given, *given.parents):  # a dangling link passes resolve() and fails at mkdir, mid-run
        if part.is_symlink() and not part.exists():
            raise LlmkitError(f"output.output_dir '{cfg.output.output_dir}': {part} is a symbolic link to "
                              f"{os.readlink(part)}, which does not exist; create that folder or pick another path")
    out = given.resolve()
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
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output.output_dir '{out}' exists and is not a directory; pick a folder path")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise LlmkitError(f"output.output_dir '{out}' is not writable ({probe} does not accept new files)")
    return run


def check_output_dir(cfg: Config) -> tuple[RunDir, str]:
    """The output dir and what the run will do with it (new / overwrite / resume): never an unsafe folder, one
    another live run holds, or one that holds another run unless asked to overwrite or resume it."""
    run = check_output_dir_is_safe(cfg)
    life.check_free(run)  # first: a folder in use is not "another run's" to overwrite or resume
    return run, life.intent(cfg, run)


def check_disk(cfg: Config, run: RunDir, sizes: model.Sizes, precision: str, conversion: int = 0) -> str:
    """Enough free disk under the run's folder for the checkpoints kept plus the export (and `conversion` bytes:
    the universal copy an elastic resume writes beside its checkpoint)."""
    probe = run.root.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    one, need = memory.disk_bytes(cfg, sizes, precision, conversion)
    keep = cfg.checkpoint.keep_last or 1
    if need > free:
        copy = f", the universal copy of the resumed checkpoint (~{conversion / GIB:.2f} GiB)" if conversion else ""
        raise LlmkitError(f"not enough disk under {probe}: checkpoints (about {one / GIB:.2f} GiB each, {keep} kept "
                          f"+ 1 being written){copy} and the export need ~{need / GIB:.2f} GiB, {free / GIB:.2f} GiB "
                          "are free. Free space, lower checkpoint.keep_last, or pick another output.output_dir.")
    return f"disk: ~{need / GIB:.2f} GiB needed, {free / GIB:.1f} GiB free under {probe}"


def zero_init() -> bool:
    """ZeRO-3 partitions the model as it loads: the accelerate config's zero3_init_flag, as the launcher set it."""
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "true"


STALE_LOCK_MINUTES = 10  # building one of DeepSpeed's ops takes a minute or two on a CPU


def check_build_locks(now: float | None = None) -> None:
    """DeepSpeed builds its ops (the CPU ranks' shared-memory communication, the CPU Adam of optimizer offload) with
    torch's extension builder, which holds a lock file while it builds: a process killed mid-build leaves it
    behind, and every later launch waits on it forever, silently. A lock older than any build is refused here."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    now = time.time() if now is None else now
    root = os.environ.get("TORCH_EXTENSIONS_DIR")  # <it>/<op>/lock, else <default root>/<python_accelerator>/<op>/lock
    for lock in sorted(Path(root).glob("*/lock") if root else Path(get_default_build_root()).glob("*/*/lock")):
        try:
            age = (now - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # its build just finished
            continue
        if age > STALE_LOCK_MINUTES:
            raise LlmkitError(f"{lock} is {age:.0f} minutes old: a build of DeepSpeed's {lock.parent.name} op was "
                              f"interrupted and every launch would wait on it; delete it (rm {lock}) unless "
                              "another run is building that op now")


def check_memory(cfg: Config, ds: dict | None, sizes: model.Sizes, precision: str, world_size: int, hw: Hardware,
                 config, causal: bool) -> memory.MemoryEstimate:
    """The memory estimate of this run (the one `llmkit estimate-memory` prints for the same settings), refused
    when its peak cannot fit one device: a GPU, or on CPU this host's memory shared by the ranks it runs (and
    there the load, too)."""
    settings = memory.settings_of(cfg, ds, sizes, precision, world_size, "gpu" if hw.gpus else "cpu", config,
                                  causal, runtime=memory.resident_bytes(), zero_init=zero_init())
    est = memory.for_settings(settings)
    _check_fits(est, hw)
    return est


def _check_fits(est: memory.MemoryEstimate, hw: Hardware) -> None:
    if hw.memory_bytes:
        local = max(parallel.local_world_size(), 1)
        budget, where = (hw.memory_bytes, f"one {hw.describe_gpu()}") if hw.gpus else \
            (hw.memory_bytes / local, f"this host's memory shared by {local} rank(s)")
        memory.check_fits(est, budget, where, with_load=not hw.gpus)


def recheck_memory(plan: Plan) -> str | None:
    """The estimate again with the runtime measured now, once the process group and DeepSpeed are up (they add
    ~0.1 GiB the preflight cannot see: it runs before them), refused as before if it no longer fits; it replaces
    the plan's estimate. The lines for the log, or None when there was no estimate."""
    if plan.estimate is None or plan.hardware is None:
        return None
    now = memory.resident_bytes()
    est = plan.estimate.rebased(now)
    _check_fits(est, plan.hardware)
    plan.estimate = est
    return (f"memory, the runtime measured again after set-up ({now / GIB:.3f} GiB):\n"
            f"  {memory.LIVE:<17} {est.peak_device_bytes / GIB:10.3f} GiB\n"
            f"  {'host at load':<17} {est.load_bytes / GIB:10.3f} GiB")


def check_model(cfg: Config):
    """The model config loads (local dir, asset or Hub id) and data.max_length fits its positions."""
    config = model.read_config(cfg.model)
    model.check_weights_present(cfg.model)
    limit = model.positions(config)
    if limit is not None and cfg.data.max_length > limit:
        raise LlmkitError(f"data.max_length {cfg.data.max_length} is over the model's limit of {limit} positions "
                          f"({config.model_type}); set data.max_length <= {limit}")
    return config, f"model: {config.model_type}, {limit or 'unknown'} positions, max_length {cfg.data.max_length} fits"


def recipe_of(cfg: Config, config) -> str:
    """The recipe a config is for, when none is named (`llmkit validate`): causal_lm for a causal-LM model or
    prompt / chat / label-word data, else classification."""
    d = cfg.data
    lm_data = bool(d.prompt_column or d.messages_column or d.prompt_template)
    return "causal_lm" if model.is_causal_lm(config.architectures) or lm_data else "classification"


def check_recipe_keys(cfg: Config, recipe: str) -> None:
    """Refuse a key set away from its default that this run would not read (the schema says who reads each),
    naming the recipe that does: set and silently ignored, it would mislead. A value that turns a key off (0,
    false, null: `output.explain_rows: 0` in a shared launch script) asks nothing of the run and passes."""
    this, defaults = schema.reader_of(recipe, cfg), Config()
    for section, cls in schema.sections():
        for f in dataclasses.fields(cls):
            readers, value = f.metadata["readers"], getattr(getattr(cfg, section), f.name)
            if this in readers or not value or value == getattr(getattr(defaults, section), f.name):
                continue
            where = schema.READER_NAMES[this] if this == "label_words" else f"recipes/{recipe}.py" + (
                " without data.prompt_template" if recipe == "causal_lm" else "")
            raise LlmkitError(f"{section}.{f.name} is set, but {where} does not read it (only "
                              f"{schema.who_reads(readers)} does); remove it from this run's config, or run that "
                              "recipe")


def check_quantize(cfg: Config, recipe: str, config) -> None:
    """output.quantize: each format for this run's kind of model and architecture, its packages installed, and a
    GGUF's tokenizer one the writer maps (where the tokenizer is a local folder or asset). Written after
    training: refused now, not then."""
    compression.check(cfg.output.quantize, "classifier" if recipe == "classification" else "causal_lm",
                    f"this {recipe} run's model", (config.architectures or [None])[0])
    if not any(n.startswith("gguf-") for n in cfg.output.quantize):
        return
    source = Path(model.locate(cfg.model.tokenizer or cfg.model.name_or_path, "model.tokenizer")).expanduser()
    if source.is_dir():  # a Hub id: checked by `llmkit quantize` before it writes
        problem = compression.gguf_tokenizer_problem(source / "tokenizer.json")
        if problem:
            raise LlmkitError(f"output.quantize asks for {', '.join(cfg.output.quantize)}, but {problem}")


def check(cfg: Config, world_size: int, recipe: str | None = None,
          say: Callable[[str], None] = lambda line: None, hw: Hardware | None = None) -> Plan:
    """Every check before training, in order, for `recipe` (classification / causal_lm; None: the one the config
    is for); `say` gets one line per check passed. `hw`: this machine's (precision.hardware()) unless given."""
    def passed(line: str) -> None:
        plan_lines.append(line)
        say(line)

    plan_lines: list[str] = []
    hw = hw or hardware()
    check_devices(hw, parallel.local_world_size())
    precision, why = resolve_precision(cfg.train.precision, hw)
    passed(f"precision: {precision} ({why})")
    check_loading(cfg, precision, hw, deepspeed=parallel.uses_deepspeed(cfg))
    parallel.check_accelerate_env(cfg, precision)
    config, line = check_model(cfg)
    passed(line)
    recipe = recipe or recipe_of(cfg, config)
    check_recipe_keys(cfg, recipe)
    check_quantize(cfg, recipe, config)
    run, intent = check_output_dir(cfg)
    passed(f"output: {run.root.resolve()} (writable, {intent} run, not in use)")
    resume, plan_elastic, conversion = None, None, 0
    if cfg.checkpoint.resume_from:  # found and verified now, once, not after the model and data are loaded
        resume = checkpoints.resolve(run, cfg.checkpoint.resume_from)
        passed(f"resume: from {resume.path} (complete, sizes and digests match)")
        # before the DeepSpeed config reads the accumulation
        plan_elastic = elastic.decide(cfg, resume.path, resume.recorded, world_size)
        if plan_elastic is not None:
            passed(plan_elastic.describe())
            conversion = elastic.universal_bytes(resume.path) if plan_elastic.universal else 0
            resume = replace(resume, elastic=plan_elastic)
    # what this launch trains with: the config's accumulation, or the one an elastic resume keeps the batch with
    accumulation = plan_elastic.accumulation if plan_elastic else cfg.train.gradient_accumulation_steps
    ds = parallel.resolve_deepspeed(cfg, precision, world_size, model.hidden_size(config), accumulation)
    stage = parallel.zero_stage(ds)
    if ds is not None:
        check_build_locks()
    if plan_elastic is not None and plan_elastic.universal:
        if stage != plan_elastic.zero_stage:
            raise LlmkitError(f"the checkpoint was written under ZeRO-{plan_elastic.zero_stage}; this launch uses "
                              f"ZeRO-{stage or 0}: resume with the checkpoint's stage (its accelerate config)")
        ds = elastic.universal_config(ds)
    if resume is not None:  # the checkpoint's run, as far as the config tells: before any model or data
        want = checkpoints.fingerprint(cfg, world_size, stage, precision, accumulation=accumulation)
        want.pop("data")  # its rows are read later; the resume compares them then
        checkpoints.refuse_other_run(resume.path, resume.recorded, want, elastic=plan_elastic is not None)
        passed("resume: the same run as the checkpoint (model, split of the work, precision, optimizer)")
    passed(f"launch: {world_size} process(es), " + (f"DeepSpeed ZeRO-{stage}, no 'auto' left" if ds else
                                                     "no DeepSpeed"))
    causal, estimate = recipe == "causal_lm", None
    try:
        sizes = model.model_sizes(cfg.model, causal_lm=causal, lora=cfg.lora)
    except LlmkitError:
        raise
    except Exception as exc:  # an architecture that cannot be built on the meta device: no size estimates
        passed(f"disk and memory: not estimated ({exc.__class__.__name__})")
    else:
        passed(check_disk(cfg, run, sizes, precision, conversion))
        estimate = check_memory(cfg, ds, sizes, precision, world_size, hw, config, causal)
        passed("memory (ZeRO formulas, DeepSpeed's peak, activations at data.max_length):\n"
               + "\n".join("      " + r for r in estimate.table().splitlines()))
    passed(trackers.check(cfg))
    if cfg.output.push_to_hub:  # no token: say so now, not after hours of training
        check_hub_token()
        passed(f"hub: a token is set for pushing to {cfg.output.hub_model_id}")
    return Plan(precision, why, ds, run, intent, causal, accumulation, plan_lines, resume, estimate, hw)


def check_inputs(cfg: Config, plan: Plan, say: Callable[[str], None] = lambda line: None) -> None:
    """The tokenizer and the data, loaded as the recipe will load them (`llmkit validate` only: a recipe meets
    the same errors when it loads them itself)."""
    if model.needs_trained_tokenizer(cfg.model):
        say("tokenizer: none given; a byte-level BPE tokenizer will be trained on the train split")
        return
    tokenizer = model.load_tokenizer(cfg.model)
    say(f"tokenizer: {type(tokenizer).__name__}, pad token {tokenizer.pad_token!r}")
    quiet = lambda m: None  # noqa: E731
    if plan.causal_lm:
        ds = lm.prepare(cfg.data, tokenizer, seed=cfg.train.seed, log=quiet)
        say(f"data: {ds.mode}, train {len(ds.train)}, validation {len(ds.validation)} examples"
            + (f", labels {ds.label_names}" if ds.label_names else ""))
        if ds.label_names:
            _say_weights(cfg, ds.train[lm.CLASS_KEY], ds.label_names, say)
        return
    labeled = sources.load_labeled(cfg.data, seed=cfg.train.seed, log=quiet)
    sizes = ", ".join(f"{role} {len(rows)}" for role, rows in labeled.rows.items())
    dropped = sum(labeled.dropped_rows.values())
    say(f"data: {sizes} rows, labels {labeled.label_names}" + (f", {dropped} empty rows dropped" if dropped
                                                                 else ""))
    _say_weights(cfg, labeled.rows["train"]["labels"], labeled.label_names, say)


def _say_weights(cfg: Config, train_labels: list[int], names: list[str], say: Callable[[str], None]) -> None:
    """train.class_weights against the data's labels (the run checks them again before its model loads)."""
    if weights := label_balance.class_weights(cfg.train.class_weights, train_labels, names):
        say("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))
