"""The reference `llmkit check-numerics` holds a run against: the run's steps again in one process, fp32, no
DeepSpeed. Equal by construction where it can be, so that only the arithmetic differs:

- weights: the run's own, as its rank 0 recorded them before the first step (llmkit.train.recording), loaded into
  the model the recipe builds (same classes, LoRA wrapping, trainable set; names and shapes checked one by one);
- rows: each step replays the micro-batches every rank recorded, as tensors, and averages their gradients as the
  run does (each micro-batch's loss over ranks x accumulation), with the run's loss (class weights included);
- optimizer: llmkit.train.optim's AdamW groups and LR schedule for the same number of steps, clipped at
  train.max_grad_norm; the gradient norm is the global one before clipping, the one the run logs."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmkit import model as models
from llmkit.config import Config
from llmkit.data.lm import NOT_MODEL_INPUTS
from llmkit.errors import LlmkitError
from llmkit.train import losses, optim
from llmkit.train.recording import BATCHES, FINAL, INITIAL, META


@dataclass
class Record:
    """What the run's ranks recorded (llmkit.train.recording)."""
    meta: dict
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    folder: Path

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Step `step`'s micro-batches of every rank, rank by rank."""
        out = []
        for rank in range(self.meta["world_size"]):
            path = self.folder / BATCHES.format(rank=rank)
            with safe_open(str(path), "pt") as f:
                ints = set(json.loads((f.metadata() or {}).get("ints", "[]")))
                keys = [k for k in f.keys() if k.split("/", 1)[0] == str(step)]
                micros = sorted({int(k.split("/")[1]) for k in keys})
                for micro in micros:
                    prefix = f"{step}/{micro}/"
                    batch = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                    out.append({k: int(v) if k in ints else v for k, v in batch.items()})
        return out

    def largest(self, key: str) -> int:
        """The most elements a recorded micro-batch's `key` holds, over every rank (0 when none has it)."""
        most = 0
        for rank in range(self.meta["world_size"]):
            with safe_open(str(self.folder / BATCHES.format(rank=rank)), "pt") as f:
                for name in f.keys():
                    if name.rsplit("/", 1)[-1] == key:
                        most = max(most, math.prod(f.get_slice(name).get_shape()))
        return most


def read_record(folder: Path) -> Record:
    """The record a finished run left; a run that stopped before its last step left no meta.json."""
    if not (folder / META).is_file():
        raise LlmkitError(f"the run left no complete numerics record in {folder} (it stopped before its last step)")
    return Record(json.loads((folder / META).read_text()), load_file(folder / INITIAL), load_file(folder / FINAL),
                  folder)


def build(cfg: Config, record: Record):
    """The recipe's model in fp32 from its config alone (no weights read), then the run's initial weights in it."""
    meta = record.meta
    attention = cfg.model.attn_implementation if cfg.model.attn_implementation != "flash_attention_2" else None
    spec = replace(cfg.model, from_scratch=True, dtype=None, attn_implementation=attention,
                   gradient_checkpointing=False)  # checkpointing recomputes the same numbers; it only saves memory
    if meta["recipe"] == "classification":
        net = models.load_classifier(spec, meta["labels"], pad_token_id=meta["pad_token_id"], lora=cfg.lora)
    else:
        net = models.load_causal_lm(spec, cfg.lora)
    net = net.float()
    params = dict(net.named_parameters())
    missing, extra = sorted(set(record.initial) - set(params)), sorted(set(params) - set(record.initial))
    if missing or extra:
        raise LlmkitError(f"the reference model is not the run's: parameters only the run has {missing[:3]}, only "
                          f"the reference has {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != record.initial[name].shape:
                raise LlmkitError(f"the reference's {name} has shape {tuple(param.shape)}, the run's "
                                  f"{tuple(record.initial[name].shape)}")
            param.copy_(record.initial[name])
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    if trainable != sorted(meta["trainable"]):
        raise LlmkitError("the reference trains other parameters than the run: "
                          f"{sorted(set(trainable) ^ set(meta['trainable']))[:3]}")
    return net


def loss_of(record: Record, class_weights: dict[str, float] | None):
    """The run's loss: the model's own, or the class-weighted one with the weights the run resolved."""
    if not class_weights:
        return None
    fn, _ = losses.for_run(lambda line: None, list(class_weights.values()), [], list(class_weights),
                           tokens=record.meta["recipe"] == "causal_lm")
    return fn


class Replay:
    """One replay of the run's steps from its initial weights and rows. The reference computes in fp32 and adds
    each step's micro-batches in the ranks' order. The rounding twin differs from it by rounding alone: it adds
    them in the opposite order, and computes in float64 for an fp32 run (its distance from the reference is then
    fp32's own rounding), in the run's precision for a bf16/fp16 run, the way the run's engine does (DeepSpeed:
    the model in that dtype, fp32 master weights; Accelerate: autocast)."""

    def __init__(self, cfg: Config, record: Record, class_weights: dict[str, float] | None, twin: bool = False):
        self.record, self.twin, meta = record, twin, record.meta
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = build(cfg, record).to(self.device).train()  # the fp32 weights the optimizer steps
        if twin and meta["precision"] == "fp32":
            self.net = self.net.double()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(meta["precision"]) if twin else None
        self.cast = self.dtype is not None and meta["zero_stage"] is not None  # DeepSpeed's way
        self.compute = copy.deepcopy(self.net).to(self.dtype) if self.cast else self.net
        self.scale = 2.0**12 if self.dtype == torch.float16 else 1.0  # a static loss scale keeps fp16 grads whole
        self.optimizer = optim.build_optimizer(cfg, self.net)
        self.scheduler = optim.build_scheduler(replace(cfg.train, max_steps=meta["steps"]), self.optimizer,
                                               meta["steps"])
        self.loss_fn = loss_of(record, class_weights)
        self.share = meta["world_size"] * meta["accumulation"]  # each micro-batch's part of the step's gradient
        self.clip = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf
        self.trained = {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def step(self, k: int) -> dict:
        """Optimizer step k: its mean loss, gradient norm before clipping, learning rate and each trained
        parameter's update (on the CPU, float64)."""
        lr = float(self.scheduler.get_last_lr()[0])
        before = {n: p.detach().double().cpu().clone() for n, p in self.trained.items()}
        if self.cast:
            with torch.no_grad():
                for mine, theirs in zip(self.compute.parameters(), self.net.parameters()):
                    mine.copy_(theirs)
        batches = self.record.micro_batches(k)
        losses = [self._backward(b) for b in (reversed(batches) if self.twin else batches)]
        if not losses:
            raise LlmkitError(f"the record holds no micro-batch of step {k}")
        if self.cast:
            for mine, theirs in zip(self.compute.parameters(), self.net.parameters()):
                if theirs.requires_grad:
                    theirs.grad = None if mine.grad is None else mine.grad.float() / self.scale
                    mine.grad = None
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.trained.values()), self.clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        updates = {n: p.detach().double().cpu() - before[n] for n, p in self.trained.items()}
        return {"loss": sum(losses) / len(losses), "grad_norm": norm, "lr": lr, "updates": updates}

    def _backward(self, batch: dict) -> float:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        autocast = self.dtype is not None and not self.cast
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=autocast):
            result = self.compute(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
            loss = self.loss_fn(result, batch) if self.loss_fn is not None else result.loss
        (loss.float() * self.scale / self.share).backward()
        return float(loss.detach())

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.net.named_parameters()}


@dataclass
class Replayed:
    """The reference's numbers step by step (index 0 is step 1) and its weights after the last step; beside them
    how far the rounding twin came out from each: the measured rounding of this model, these rows, this precision."""
    loss: list[float]
    grad_norm: list[float]
    lr: list[float]
    update_norms: list[dict[str, float]]  # per step: each trained parameter's update norm
    final: dict[str, torch.Tensor]
    twin: dict  # "loss", "grad_norm", "updates" (per step {name: |twin's - reference's|}), "weights" at the end
    seconds: float = 0.0


def replay(cfg: Config, record: Record, class_weights: dict[str, float] | None = None) -> Replayed:
    """The reference and its rounding twin, step by step together (on the GPU where there is one, TF32 off)."""
    began = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round fp32 matmuls to 10 bits
    torch.backends.cudnn.allow_tf32 = False
    ref, twin = Replay(cfg, record, class_weights), Replay(cfg, record, class_weights, twin=True)
    out = Replayed([], [], [], [], {}, {"loss": [], "grad_norm": [], "updates": []})
    for k in range(1, record.meta["steps"] + 1):
        a, b = ref.step(k), twin.step(k)
        out.loss.append(a["loss"])
        out.grad_norm.append(a["grad_norm"])
        out.lr.append(a["lr"])
        out.update_norms.append({n: float(u.double().norm()) for n, u in a["updates"].items()})
        out.twin["loss"].append(b["loss"])
        out.twin["grad_norm"].append(b["grad_norm"])
        out.twin["updates"].append({n: float((b["updates"][n].double() - u.double()).norm())
                                    for n, u in a["updates"].items()})
    out.final, out.twin["weights"] = ref.weights(), twin.weights()
    out.seconds = time.perf_counter() - began
    return out
