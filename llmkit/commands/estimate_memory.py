"""`llmkit estimate-memory`: the memory estimate a run's preflight makes (llmkit.memory.for_settings), for settings
given as flags instead of a config. The flags become the config keys a run reads; the DeepSpeed JSON is the one
llmkit ships for the stage (ds_configs/zero<stage>.json, or --deepspeed-config), with the offload sections added,
resolved as a run resolves it; the runtime is this process's resident memory once it has imported what a recipe
imports, measured as the preflight does."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit import finish, memory, model, shipped
from llmkit.config import load_config
from llmkit.errors import LlmkitError
from llmkit.launch import parallel
from llmkit.train import loop

# what a recipe imports before its preflight measures the runtime, imported here too, so the two measure alike
RECIPE_MODULES = (finish, loop)

OFFLOADS = {"none": (), "optimizer": ("offload_optimizer",), "params": ("offload_param",),
            "both": ("offload_optimizer", "offload_param")}


def _refuse(args) -> None:
    if args.lora_r < 0:
        raise LlmkitError(f"--lora-r must be >= 1 (or 0: no LoRA), got {args.lora_r}")
    if args.qlora and not args.lora_r:
        raise LlmkitError("--qlora trains LoRA adapters on the 4-bit base: give --lora-r too")
    if (args.batch_size or args.seq_len) and not (args.batch_size > 0 and args.seq_len > 0):
        raise LlmkitError("--batch-size and --seq-len go together, both >= 1 (tokens of one micro-batch)")
    if args.no_deepspeed and (args.zero_stage or args.offload != "none" or args.deepspeed_config):
        raise LlmkitError("--no-deepspeed is plain data parallel: --zero-stage 0, no --offload or --deepspeed-config")


def overrides(args) -> list[str]:
    """The config keys (`--section.key value`) the flags stand for."""
    keys = {"model.name_or_path": args.model, "train.precision": args.precision,
            "data.dataset": "unread",  # a config names its data; the estimate reads only the model's config
            "model.trust_remote_code": args.trust_remote_code,
            "model.gradient_checkpointing": args.gradient_checkpointing,
            "lora.enabled": bool(args.lora_r), "lora.load_in_4bit": args.qlora}
    if args.lora_r:
        keys["lora.r"] = args.lora_r
    if args.batch_size:
        keys.update({"train.per_device_batch_size": args.batch_size, "data.max_length": args.seq_len})
    if args.eval_batch_size:
        keys["train.eval_batch_size"] = args.eval_batch_size
    if args.loss_chunk is not None:  # the run's train.loss_chunk: how much of the logits the loss holds
        keys["train.loss_chunk"] = args.loss_chunk
    if args.padded:  # prompt/response rows: padded to the longest, with a mask (text is packed into blocks)
        keys["data.format"] = "prompt_response"
    return [part for key, value in keys.items()
            for part in (f"--{key}", json.dumps(value) if isinstance(value, bool) else str(value))]


def deepspeed_source(args) -> tuple[dict, str] | None:
    """The DeepSpeed JSON a run at these settings would launch with (None: --no-deepspeed) and where it is from."""
    if args.no_deepspeed:
        return None
    path = Path(args.deepspeed_config) if args.deepspeed_config else shipped.named(f"zero{args.zero_stage}",
                                                                                   "deepspeed")
    if path is not None and path.is_file():
        ds, where = json.loads(path.read_text()), str(path)
    elif args.deepspeed_config:
        raise LlmkitError(f"--deepspeed-config {path}: no such file")
    else:
        ds, where = {"zero_optimization": {"stage": args.zero_stage}}, "DeepSpeed's defaults"
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != args.zero_stage:
        raise LlmkitError(f"{where} is ZeRO-{zero.get('stage', 0)}, --zero-stage says {args.zero_stage}")
    for part in OFFLOADS[args.offload]:
        zero[part] = {"device": "cpu", "pin_memory": True}
    return ds, where


def estimate(args) -> memory.MemoryEstimate:
    """The estimate for the command's flags: memory.for_settings over the same Settings a run's preflight builds."""
    _refuse(args)
    cfg = load_config(None, overrides(args))
    causal = args.task == "causal-lm"
    config = model.read_config(cfg.model)
    sizes = model.model_sizes(cfg.model, causal_lm=causal, lora=cfg.lora)
    source = deepspeed_source(args)
    ds = None if source is None else parallel.resolve_deepspeed(cfg, args.precision, args.num_gpus,
                                                                model.hidden_size(config), source=source)
    settings = memory.settings_of(cfg, ds, sizes, args.precision, args.num_gpus, args.device, config, causal,
                                  runtime=memory.resident_bytes(),
                                  zero_init=args.zero_stage == 3 and not args.no_zero3_init,
                                  micro_batch=bool(args.batch_size))
    return memory.for_settings(settings)


def main(args) -> None:
    """Print the estimate's table and what its total means."""
    est = estimate(args)
    print(est.table())
    where = "no DeepSpeed" if args.no_deepspeed else f"DeepSpeed config: {deepspeed_source(args)[1]}"
    print(f"({where}; {memory.LIVE}: tensors held at once, what a run reports as live_peak_bytes beside "
          "peak_memory_bytes, what the process or GPU holds"
          + ("; no --batch-size: the model states only" if not args.batch_size else "") + ")")
