"""`llmkit check-numerics`: a recipe config and an Accelerate config run for a few optimizer steps as configured (the
real launcher, its ranks, ZeRO stage, offload, precision, accumulation), recording what the reference needs
(llmkit.train.recording); then the same steps again as the reference: one process, fp32, no DeepSpeed, the run's
initial weights and rows (llmkit.train.reference). Each step's loss, gradient norm, learning rate and update, and
every parameter at the end, are held against tolerances that follow from the precision (llmkit.train.numerics).

The verdict, with the library versions and the resolved DeepSpeed config, goes to <output>/verdict.json; one line
says it. Exit 0: passed; 1: a divergence; 2: a user error (a config, a GPU config asked on a CPU machine);
3: the run itself failed."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmkit import shipped
from llmkit.commands import launcher
from llmkit.config import load_config
from llmkit.config.typed import read_yaml
from llmkit.errors import USER_ERROR, LlmkitError
from llmkit.rundir import outputs
from llmkit.rundir.layout import MODEL_CONFIG, RunDir, read_jsonl
from llmkit.train import checked_model, numerics, reference

DIVERGED, RUN_FAILED = 1, 3
VERDICT = "verdict.json"
OWNS = (VERDICT, "model", "record", "run")  # everything the check writes in its folder
# what the run skips unless the command line asks for it: none of it is numerics, each costs minutes
QUIET = ["--output.explain_rows", "0", "--output.verify_export", "false", "--output.quantize", "[]"]
# a shipped GPU config -> the CPU config (and DeepSpeed JSON) that checks its settings on this machine
CPU_TWIN = {"ddp": "cpu_zero0", "zero1": "cpu_zero1", "zero2": "cpu_zero2", "zero3": "cpu_zero3",
            "zero3_offload": "cpu_zero3 --deepspeed.config_file zero3_offload"}
WIDTHS = ("hidden_size", "intermediate_size", "n_inner", "ffn_dim", "d_ff", "d_model", "dim", "hidden_dim")


def runnable_here(path: Path, has_gpu: bool) -> None:
    """Refuse an Accelerate config this machine cannot launch: several machines, or GPU ranks without a GPU."""
    acc = read_yaml(path, "Accelerate config") or {}
    if int(acc.get("num_machines") or 1) > 1:
        raise LlmkitError(f"--accelerate-config {path.name} spans {acc['num_machines']} machines; check-numerics "
                          "launches on one: check its one-machine form (e.g. zero3) on one node")
    kind = acc.get("distributed_type") or "NO"
    if kind in ("DEEPSPEED", "MULTI_GPU") and acc.get("gpu_ids") != "" and not has_gpu:
        twin = CPU_TWIN.get(path.stem, "cpu_zero2")
        raise LlmkitError(f"--accelerate-config {path.name} runs its ranks on GPUs ({kind}) and this machine has "
                          f"none: check it on the GPU machine. Here, its CPU form checks the same settings on 2 CPU "
                          f"ranks (--accelerate-config {twin}), but not the GPU kernels or NCCL it would run")


def _clear(out: Path) -> None:
    for name in OWNS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _launch(args: argparse.Namespace, accelerate: Path, out: Path, model_dir: Path) -> tuple[int, float]:
    """The configured run through `llmkit train` (the real launcher), recording into <out>/record."""
    forced = ["--train.max_steps", str(args.steps), "--train.logging_steps", "1", "--train.report_to", "none",
              "--output.output_dir", str(out / "run"), "--output.push_to_hub", "false",
              "--checkpoint.resume_from", "null", "--model.name_or_path", str(model_dir), "--lora.dropout", "0.0"]
    cmd = launcher.train_argv(args, accelerate)
    began = time.perf_counter()
    env = {**os.environ, "LLMKIT_NUMERICS": str(out / "record")}
    code = subprocess.run([*cmd, *QUIET, *args.overrides, *forced], env=env).returncode
    return code, time.perf_counter() - began


def run_numbers(run: RunDir, meta: dict) -> dict:
    """The run's own numbers per step: the loss and gradient norm it logged, the LR and updates it recorded."""
    rows, _ = read_jsonl(run.scalars)
    return {"loss": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
            "grad_norm": {r["step"]: r["train/grad_norm"] for r in rows if "train/grad_norm" in r},
            "lr": meta["lr"], "update_norms": meta["update_norms"]}


def longest_sum(model_dir: Path, record: reference.Record) -> int:
    """n of the tolerances: the model's widest inner dimension, a micro-batch's tokens, ranks x accumulation."""
    config = json.loads((model_dir / MODEL_CONFIG).read_text())
    widths = [v for k, v in config.items() if k in WIDTHS and isinstance(v, int)]
    return max([*widths, record.largest("input_ids"), record.meta["world_size"] * record.meta["accumulation"]])


def describe(meta: dict, ds_config: dict | None, model: dict) -> str:
    """What was checked, in words: the recipe, ranks, DeepSpeed, precision, accumulation, steps, the model."""
    zero = ds_config.get("zero_optimization", {}) if ds_config else {}
    offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
               if (zero.get(k) or {}).get("device") in ("cpu", "nvme")]
    how = f"DeepSpeed ZeRO-{zero.get('stage')}" + (f" (offload: {', '.join(offload)})" if offload else "") \
        if ds_config else "no DeepSpeed"
    cut = f"; a truncated copy: its first {model['layers']} of {model['of']} layers" if model["truncated"] else ""
    return (f"{meta['recipe']} on {meta['world_size']} rank(s), {how}, {meta['precision']}, accumulation "
            f"{meta['accumulation']}, {meta['steps']} steps{cut}")


def _layers(args: argparse.Namespace, cfg) -> int | None:
    """--layers, or as many as one fp32 process holds (the reference's memory) when the whole model does not."""
    if args.layers is not None:
        return args.layers
    host = _available_memory() * 0.8
    if torch.cuda.is_available():  # the replays train on the GPU (48 of the 100 bytes), the records stay on the host
        host = min(host, torch.cuda.get_device_properties(0).total_memory * 0.8 * 100 / 48)
    fit = checked_model.layers_that_fit(checked_model.source(cfg.model), host)
    return fit[0] if fit else None


def _available_memory() -> int:
    """The host memory a new process may take: MemAvailable (free plus reclaimable cache), else the free pages."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def main(args: argparse.Namespace) -> None:
    """`llmkit check-numerics RECIPE --config C --accelerate-config A [--steps N] [--layers N] [--section.key v]`."""
    began = time.perf_counter()
    out = args.output
    outputs.check(out, "check-numerics", (out / VERDICT).is_file(), OWNS, args.overwrite)
    if args.steps < 1:
        raise LlmkitError(f"--steps is {args.steps}; check at least 1 optimizer step")
    accelerate = shipped.find(args.accelerate_config, "accelerate", "--accelerate-config")
    runnable_here(accelerate, torch.cuda.is_available())
    cfg = load_config(args.config, args.overrides)  # a bad config stops here, before anything is written
    if cfg.lora.enabled and cfg.lora.load_in_4bit:
        raise LlmkitError("QLoRA: a 4-bit base has no fp32 reference to compare with; check the run without "
                          "lora.load_in_4bit")
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    model = checked_model.prepare(cfg.model, out / "model", _layers(args, cfg))
    if model["truncated"]:
        print(f"check-numerics: checking a truncated copy of the model, its first {model['layers']} of {model['of']} "
              "layers (every other shape the same)" + ("" if args.layers else ": the whole model does not fit the "
                                                       "one-process fp32 reference in this machine's memory"))
    code, run_seconds = _launch(args, accelerate, out, out / "model")
    if code != 0:
        if code == USER_ERROR:
            sys.exit(USER_ERROR)  # the run said its one line
        print(f"check-numerics: the run failed (exit {code}); its folder is {out / 'run'}", file=sys.stderr)
        sys.exit(RUN_FAILED)
    verdict = judge(out, model)
    verdict.update(recipe=args.recipe, config=str(args.config), accelerate_config=str(accelerate))
    verdict["seconds"].update(run=round(run_seconds, 1), total=round(time.perf_counter() - began, 1))
    (out / VERDICT).write_text(json.dumps(_plain(verdict), indent=1) + "\n")
    print(f"{verdict['summary']}\nverdict: {out / VERDICT}", flush=True)
    if not verdict["passed"]:
        sys.exit(DIVERGED)


def judge(out: Path, model: dict) -> dict:
    """The verdict on the run in <out>/run and its record: the reference and its twin replayed, every number held
    against its tolerance, with what ran (versions, device, the resolved DeepSpeed config)."""
    run = RunDir(out / "run")
    record = reference.read_record(out / "record")
    run_cfg = load_config(run.config)  # the resolved config the run trained with
    ref = reference.replay(run_cfg, record, run.read_metrics().get("train", {}).get("class_weights"))
    tol = numerics.tolerances(record.meta["precision"], record.meta["steps"], longest_sum(out / "model", record))
    sizes = {name: w.numel() for name, w in record.initial.items()}
    steps = numerics.compare_steps(run_numbers(run, record.meta), ref, tol, sizes)
    held = numerics.compare_weights(record.initial, record.final, ref, record.meta["trainable"], tol)
    result = numerics.verdict(steps, held, tol)
    ds_config = json.loads(run.ds_config.read_text()) if run.ds_config.is_file() else None
    what = describe(record.meta, ds_config, model)
    info = run.read_run_info()
    return {"passed": result["passed"], "summary": numerics.summary(result, what), "checked": what, "model": model,
            "versions": {**info.get("versions", {}), "python": info.get("python")}, "device": info.get("device"),
            "git_commit": info.get("git_commit"), "deepspeed_config": ds_config,
            "seconds": {"reference": round(ref.seconds, 1)}, **result}


def _plain(value):
    """JSON that any reader takes: an infinite relative difference (the reference did not move it) as "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
