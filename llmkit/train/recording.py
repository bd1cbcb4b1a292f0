"""What each rank records for `llmkit check-numerics` (LLMKIT_NUMERICS=<folder>), and the numerics faults its
tests plant (LLMKIT_FAULT, llmkit.faults). Both watch the loop from its hooks; a run with neither set makes none.

The record is what the reference needs to compute the same steps: rank 0 writes every parameter in fp32 before the
first step and after the last (the optimizer's fp32 master where DeepSpeed keeps one, which is what a bf16 run
really starts from and ends with), the learning rate each step used, the size of each step's update of each
trained parameter (so a divergence is placed at its step) and what the run was (ranks, accumulation, precision);
each rank writes the micro-batches it trained on, so the reference replays exactly those rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmkit import faults
from llmkit.errors import LlmkitError

RECORD = os.environ.get("LLMKIT_NUMERICS", "")  # the folder the check reads; "" in a normal run
PLANTED = ("drop_last_micro", "scale_grad", "skip_partition", "lr_ahead")
META, INITIAL, FINAL = "meta.json", "initial.safetensors", "final.safetensors"
BATCHES = "batches_rank{rank}.safetensors"


def wanted() -> bool:
    """True when this run records for a check or carries a planted numerics fault."""
    return bool(RECORD) or faults.POINT in PLANTED


def micro_key(step: int, micro: int, key: str) -> str:
    """The name a micro-batch's tensor is stored under: step, its micro-batch on this rank, the batch key."""
    return f"{step}/{micro}/{key}"


class Watch:
    """Called from llmkit.train.hooks at the loop's named points: start, each micro-batch, its loss, each step."""

    def __init__(self, run):
        self.run, self.acc = run, run.accelerator
        self.rank = self.acc.process_index
        self.folder = Path(RECORD) if RECORD else None
        self.last = run.cfg.train.max_steps  # the check always sets it
        self.model = self.scheduler = None
        self.step, self.micro = 0, 0
        self.batches: dict[str, torch.Tensor] = {}
        self.ints: list[str] = []  # batch values that were plain ints (a flattened batch's row count)
        self.lr: list[float] = []
        self.updates: list[dict[str, float]] = []  # per step: each trained parameter's update norm (rank 0)
        self.previous: dict[str, torch.Tensor] | None = None  # rank 0: the weights before this step
        self.kept: list[torch.Tensor] | None = None  # skip_partition: this rank's partition before the step
        self.done: set[str] = set()  # the faults that fire once

    def started(self, model, scheduler) -> None:
        """Before the first step: the initial weights (a collective under ZeRO-3: every rank gathers)."""
        self.model, self.scheduler = model, scheduler
        if self.folder is not None:
            weights = full_weights(self.acc, model)
            if self.acc.is_main_process:
                self.folder.mkdir(parents=True, exist_ok=True)
                save_file(weights, str(self.folder / INITIAL))
                self.previous = weights

    def batch(self, step: int, batch: dict) -> None:
        """Before the forward of a micro-batch: the step's learning rate (at its first), the batch itself."""
        if step != self.step:
            self.step, self.micro = step, 0
            self._before_step(step)
            self.lr.append(float(self.scheduler.get_last_lr()[0]))
        if self.folder is not None:
            for key, value in batch.items():
                if isinstance(value, int):
                    value = torch.tensor(value)
                    self.ints.append(key)
                if not isinstance(value, torch.Tensor):
                    raise LlmkitError(f"check-numerics cannot replay batch key '{key}' ({type(value).__name__})")
                self.batches[micro_key(step, self.micro, key)] = value.detach().cpu().contiguous().clone()
        self.micro += 1

    def loss(self, step: int, loss):
        """The planted faults that act on the gradient; the loss's value, which the run logs, stays as it is."""
        if faults.from_step("scale_grad", step, self.rank):
            loss = loss * 2 - loss.detach()
        if faults.from_step("drop_last_micro", step, self.rank) and self.acc.sync_gradients:
            loss = loss * 0 + loss.detach()
        return loss

    def stepped(self, model, step: int) -> None:
        """After optimizer step `step`: a skipped partition put back; after the last step, the record written."""
        if self.kept is not None:
            _restore_partition(model, self.kept)
            self.kept = None
        if self.folder is None:
            return
        weights = full_weights(self.acc, model)  # every step: a collective under ZeRO
        if self.acc.is_main_process:
            self.updates.append(update_norms(self.previous, weights, self.trainable(model)))
            self.previous = weights
        if step == self.last:
            self._write(model, weights)

    def trainable(self, model) -> list[str]:
        return [name for name, p in self.acc.unwrap_model(model).named_parameters() if p.requires_grad]

    def _before_step(self, step: int) -> None:
        """The planted faults that act once, before step `step`'s update."""
        if "lr_ahead" not in self.done and faults.from_step("lr_ahead", step, self.rank):
            self.done.add("lr_ahead")
            self.scheduler.step()
        if "skip_partition" not in self.done and faults.from_step("skip_partition", step, self.rank):
            self.done.add("skip_partition")
            self.kept = [flat.detach().clone() for flat in _zero3_optimizer(self.model).fp32_partitioned_groups_flat]

    def _write(self, model, weights: dict[str, torch.Tensor]) -> None:
        save_file(self.batches, str(self.folder / BATCHES.format(rank=self.rank)),
                  metadata={"ints": json.dumps(sorted(set(self.ints)))})
        if not self.acc.is_main_process:
            return
        save_file(weights, str(self.folder / FINAL))
        module = self.acc.unwrap_model(model)
        config = getattr(module, "config", None)
        labels = getattr(config, "id2label", None) if self.run.recipe == "classification" else None
        meta = {
            "recipe": self.run.recipe, "world_size": self.acc.num_processes, "accumulation": self.run.accumulation,
            "precision": self.run.precision, "zero_stage": self.run.zero_stage, "steps": self.last, "lr": self.lr,
            "labels": [labels[i] for i in sorted(labels)] if labels else None,
            "pad_token_id": getattr(config, "pad_token_id", None),
            "trainable": self.trainable(model), "update_norms": self.updates,
        }
        (self.folder / META).write_text(json.dumps(meta, indent=1))


def full_weights(acc, model) -> dict[str, torch.Tensor]:
    """Every parameter whole, in fp32: the optimizer's fp32 master where DeepSpeed keeps one, else the parameter.
    Under ZeRO each call gathers, so every rank must call it."""
    module = acc.unwrap_model(model)
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    if deepspeed:
        import deepspeed as ds
        from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if deepspeed and param.requires_grad else None
        if full is None and hasattr(param, "ds_id"):  # a frozen ZeRO-3 parameter: gathered for the copy
            with ds.zero.GatheredParameters([param]):
                full = param.data.float().clone()
        elif full is None:
            full = param.data.float().clone()
        out[name] = full.detach().float().cpu().contiguous()
    return out


def update_norms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], names: list[str]
                 ) -> dict[str, float]:
    """How far one step moved each of `names`: the L2 norm of after - before, computed in float64."""
    return {n: float((after[n].double() - before[n].double()).norm()) for n in names}


def _zero3_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        raise LlmkitError("LLMKIT_FAULT skip_partition plants a ZeRO-3 fault; this run is not ZeRO-3")
    return optimizer


def _restore_partition(model, kept: list[torch.Tensor]) -> None:
    """This rank's partition back to its weights before the step: the fp32 master and the parameters' own copy
    (the same tensor in an fp32 run)."""
    optimizer = _zero3_optimizer(model)
    for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        flat.data.copy_(kept[i])
        own = optimizer.fp16_partitioned_groups_flat[i]
        if own is not None and own is not flat:
            own.data.copy_(flat.data)
